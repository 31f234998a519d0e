"""Training objectives as plugins (dstune.plugins.OBJECTIVES): `sft`, supervised cross-entropy, is dstune's own;
packages add theirs through the `dstune.objectives` entry point group. See base.py for what an objective owns."""

from .base import LossOutput, Objective, TrainContext
from .sft import SupervisedCrossEntropy

__all__ = ["LossOutput", "Objective", "SupervisedCrossEntropy", "TrainContext"]
