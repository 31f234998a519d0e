"""Training objectives as plugins (dstune.plugins.OBJECTIVES): `sft`, supervised cross-entropy, `continual`,
the same with controls against forgetting (KL anchor, EWC, O-LoRA), and `kd`, knowledge distillation from a frozen
teacher, are dstune's own;
packages add theirs through the `dstune.objectives` entry point group. See base.py for what an objective owns."""

from .base import LossOutput, Objective, TrainContext
from .continual import Continual
from .distill import Distill
from .sft import SupervisedCrossEntropy

__all__ = ["Continual", "Distill", "LossOutput", "Objective", "SupervisedCrossEntropy", "TrainContext"]
