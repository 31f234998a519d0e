"""`sft`: supervised cross-entropy over the answer tokens (dstune's default objective)."""

from __future__ import annotations

from ...plugins import OBJECTIVES
from ..loss import supervised_lm_loss
from .base import LossOutput, Objective


@OBJECTIVES.register("sft")
class SupervisedCrossEntropy(Objective):
    """Token-level cross-entropy on supervised positions only, the LM head in chunks where the architecture allows."""

    def loss(self, model, batch):
        loss_sum, _ = supervised_lm_loss(model, batch)
        return LossOutput(loss_sum)
