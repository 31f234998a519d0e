"""Length-grouped batches in a random order."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ShuffledLengthGroupedSampler(Sampler[int]):
    """Groups samples of similar length into batches, then shuffles the batches.

    HF's LengthGroupedSampler walks each megabatch from the longest samples to the shortest, so on a small dataset
    the model sees long samples early and short ones late in every epoch. Shuffling whole batches keeps the low
    padding without that drift.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, megabatch_batches: int = 50):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.megabatch = megabatch_batches * batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate/Trainer at each epoch, so every epoch has its own order."""
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """The batches of this epoch, in training order."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), self.megabatch):
            chunk = sorted(order[start:start + self.megabatch], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffled]

    def __iter__(self):
        for batch in self.batches():
            yield from batch

    def __len__(self) -> int:
        return len(self.lengths)
