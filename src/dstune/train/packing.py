"""Packing: the samples of a batch share rows, and a block-diagonal causal mask keeps each one to itself.

Restarting `position_ids` per sample does not stop attention across samples on CPU with sdpa or eager attention,
so the collator builds an explicit 4-D mask: token i sees token j only if both belong to the same sample and
j <= i. Transformers passes a 4-D mask to the attention as it is. With positions restarted and the first label of
each sample dropped, every sample's logits and loss are those it has alone (tests/train/test_packing.py).

The batch keeps its samples (`train.batch_size` samples per step, as without packing); only the padding goes.
The row width is chosen per batch: the width, from the longest sample up to `max_width`, with the fewest padded
slots after best-fit-decreasing packing.
"""

from __future__ import annotations

import torch

from ..data.tokenize import IGNORE_INDEX
from ..errors import InputError
from .collate import SlotCounter, with_sample_ids


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices packed into bins of `capacity`: longest first, each into the fullest bin it fits."""
    bins: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size = lengths[index]
        fits = [b for b in range(len(bins)) if free[b] >= size]
        if fits:
            best = min(fits, key=free.__getitem__)
            bins[best].append(index)
            free[best] -= size
        else:
            bins.append([index])
            free.append(capacity - size)
    return bins


def choose_rows(lengths: list[int], max_width: int, candidates: int = 16) -> tuple[list[list[int]], int]:
    """Rows of sample indices and their width: the width with the fewest slots (rows x width), narrowest on ties."""
    longest = max(lengths)
    widths = sorted({longest, *(min(max_width, longest + (max_width - longest) * k // candidates)
                                for k in range(1, candidates + 1))})
    best = None
    for width in widths:
        rows = best_fit_decreasing(lengths, width)
        used = max(sum(lengths[i] for i in row) for row in rows)
        if best is None or len(rows) * used < best[0]:
            best = (len(rows) * used, rows, used)
    return best[1], best[2]


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """[rows, 1, width, width] booleans from per-token segment ids: same segment and not in the future."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril_()
    return ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]


class PackingCollator(SlotCounter):
    """Packs a batch's samples into rows with restarted positions and a block-diagonal causal mask.

    `attn_implementation` decides the mask's form: booleans (True = attend) for sdpa, an additive float mask for
    eager. Padding tokens at the end of a row form their own segment, so no attention row is empty.
    The collator counts real and padded slots (`padding_fraction`) for the train summary.
    """

    def __init__(self, pad_token_id: int, max_width: int, attn_implementation: str = "sdpa",
                 dtype: torch.dtype = torch.float32):
        if attn_implementation not in ("sdpa", "eager"):
            raise InputError(f"train.packing: packing needs sdpa or eager attention, and the model uses "
                             f"{attn_implementation!r}; set train.packing to false")
        super().__init__()
        self.pad_token_id = pad_token_id
        self.max_width = max_width
        self.additive = attn_implementation == "eager"
        self.dtype = dtype

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(s["input_ids"]) for s in samples]
        rows, width = choose_rows(lengths, max(self.max_width, max(lengths)))
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        segments = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for index in row:
                sample, n = samples[index], lengths[index]
                input_ids[r, start:start + n] = torch.tensor(sample["input_ids"])
                labels[r, start + 1:start + n] = torch.tensor(sample["labels"][1:])  # nothing predicts a first token
                position_ids[r, start:start + n] = torch.arange(n)
                segments[r, start:start + n] = index
                start += n
            position_ids[r, start:] = torch.arange(width - start)
        mask = block_causal_mask(segments)
        if self.additive:
            mask = torch.zeros(mask.shape, dtype=self.dtype).masked_fill_(~mask, torch.finfo(self.dtype).min)
        self.count(sum(lengths), len(rows) * width)
        return with_sample_ids({"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids,
                                "labels": labels, "num_tokens": torch.tensor(sum(lengths))}, samples)
