"""Training: the LoRA recipe on HF Trainer, with a supervised-positions loss and generation-based early stopping."""

from .collate import CausalCollator
from .loss import supervised_lm_loss, supervised_positions
from .trainer import DstuneTrainer, TrainResult, train

__all__ = ["CausalCollator", "DstuneTrainer", "TrainResult", "supervised_lm_loss", "supervised_positions", "train"]
