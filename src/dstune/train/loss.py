"""Causal-LM loss with the LM head run only where a label is supervised."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.tokenize import IGNORE_INDEX


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Columns p whose next token (p + 1) is supervised in at least one row."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)


def supervised_lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy, the number of supervised tokens, and the logits that were computed.

    `logits_to_keep` with a position tensor keeps the vocabulary projection off unsupervised columns: with
    left-padded short answers that is most of the sequence, and the LM head is a fifth of a small model's FLOPs.
    """
    labels = batch["labels"]
    positions = supervised_positions(labels)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=positions).logits
    targets = labels[:, positions + 1]
    loss_sum = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (targets != IGNORE_INDEX).sum(), logits
