"""Training objectives as plugins (dstune.plugins.OBJECTIVES): `sft`, supervised cross-entropy, and `continual`,
the same with controls against forgetting (KL anchor, EWC, O-LoRA), are dstune's own;
packages add theirs through the `dstune.objectives` entry point group. See base.py for what an objective owns."""

from .base import LossOutput, Objective, TrainContext
from .continual import Continual
from .sft import SupervisedCrossEntropy

__all__ = ["Continual", "LossOutput", "Objective", "SupervisedCrossEntropy", "TrainContext"]
