"""Batching for causal-LM fine-tuning."""

from __future__ import annotations

import torch

from ..data.tokenize import IGNORE_INDEX


class SlotCounter:
    """Counts the real tokens and the slots of the batches a collator makes, for the train summary."""

    def __init__(self):
        self.real_tokens = 0
        self.slots = 0

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.slots if self.slots else 0.0

    def count(self, real: int, slots: int) -> None:
        self.real_tokens += real
        self.slots += slots


def with_sample_ids(batch: dict, samples: list[dict]) -> dict:
    """Add the batch's sample ids (for the sample-order log and error messages; the model never sees them)."""
    if samples and "id" in samples[0]:
        batch["sample_ids"] = [s["id"] for s in samples]
    return batch


class CausalCollator(SlotCounter):
    """Pads a batch on the left, so every answer ends at the last column and the LM head covers few positions.

    Position ids are counted from each sample's first real token, so padding does not shift RoPE positions.
    """

    def __init__(self, pad_token_id: int):
        super().__init__()
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            input_ids[row, width - n:] = torch.tensor(sample["input_ids"])
            # A sample's first token is never predicted (nothing of it comes before); left of it is padding.
            labels[row, width - n + 1:] = torch.tensor(sample["labels"][1:])
            attention_mask[row, width - n:] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        real = int(attention_mask.sum())
        self.count(real, attention_mask.numel())
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                 "labels": labels, "num_tokens": torch.tensor(real)}
        if "task" in samples[0]:  # multi-task models pick each row's task prefix
            batch["task"] = [s["task"] for s in samples]
        return with_sample_ids(batch, samples)
