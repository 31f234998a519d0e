"""The objective plugin: the loss a training step minimises, and the hooks around it.

An objective is one module that defines an `Objective` subclass and registers it:

    from dstune.plugins import OBJECTIVES
    from dstune.train.objectives import LossOutput, Objective

    @OBJECTIVES.register("my_objective")
    class MyObjective(Objective):
        options = MyOptions                       # the recipe section train.my_objective (None: no section)
        def loss(self, model, batch): ...         # -> LossOutput(summed loss, logs)

and a recipe selects it with `train.objective: my_objective`. The loop (dstune.train.loop) makes one instance per
run and calls, in this order:

    check(options, recipe)                    (a classmethod) in the preflight, before any stage: one-line errors
    setup()                                   once, after the adapter is added, before the optimizer exists
    parameter_groups()                        extra trainable parameters and their optimizer settings
    sampler(lengths, batch_size, seed)        the training order, or None for a seeded shuffle per epoch
    wrap(model, optimizer, dataloader)        once, after accelerate prepared them (e.g. Opacus' make_private)
    load_state_dict(state)                    on resume, with what state_dict() saved in the checkpoint
    per optimizer step:
        on_step_begin(step)
        per micro-batch: count(batch); loss(model, batch); before_backward(output, scale); backward(loss, ...)
        on_step_end(step) -> extra logs
    state_dict()                              at every checkpoint: saved without pickle, so resume is exact
    on_train_end(model, adapter_dir)          after the best weights are restored, before the adapter is saved
    summary()                                 what the run's manifest records under "objective_summary"

Losses are sums: the loop divides by the number of supervised tokens in the whole accumulated step on every rank
(`count`), so gradient accumulation and data parallelism give the gradient of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...data.tokenize import IGNORE_INDEX


@dataclass
class LossOutput:
    """A micro-batch's summed loss, and other summed quantities to log (each divided like the loss)."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class TrainContext:
    """What an objective may use: the run's recipe, tokenizer, model (unwrapped), accelerator and data."""

    recipe: object
    tokenizer: object
    model: torch.nn.Module
    accelerator: object
    train_set: list[dict]
    run_dir: Path


class Objective:
    """A training objective plugin; subclasses implement `loss` and override the hooks they need."""

    options = None  # the pydantic class of the recipe section train.<name>, or None

    def __init__(self, options, context: TrainContext):
        self.config = options
        self.context = context

    @classmethod
    def check(cls, options, recipe) -> None:
        """Before any stage runs: raise InputError for what the recipe alone shows is wrong (files, combinations)."""

    def setup(self) -> None:
        """Once, before the optimizer is built: load a frozen second model, create extra parameters, ..."""

    def parameter_groups(self) -> list[dict]:
        """Extra trainable parameters as optimizer groups ({"params": [...], "lr": ..., "weight_decay": ...})."""
        return []

    def sampler(self, lengths: list[int], batch_size: int, seed: int):
        """A sampler of training sample indices (one epoch per iteration), or None for a seeded shuffle.

        The loop calls `set_epoch(epoch)` before each epoch and, when the sampler has it, `set_step(step)` with the
        optimizer steps done when that epoch starts (a curriculum orders samples by step). Under data parallelism
        accelerate deals its batches out to the ranks.
        """
        return None

    def wrap(self, model, optimizer, dataloader):
        """After accelerate prepared them: return replacements (Opacus wraps all three), or them unchanged."""
        return model, optimizer, dataloader

    def count(self, batch: dict) -> torch.Tensor:
        """What a micro-batch's loss is divided by, summed over the step (default: its supervised tokens)."""
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def loss(self, model, batch: dict) -> LossOutput:
        """The summed loss of one micro-batch (model: the prepared, possibly wrapped training model)."""
        raise NotImplementedError

    def before_backward(self, output: LossOutput, scale: torch.Tensor) -> None:
        """Between the forward and the backward of a micro-batch: `scale` turns summed losses into the step's
        mean. GradNorm calls torch.autograd.grad on named shared parameters here (retain_graph=True)."""

    def backward(self, loss: torch.Tensor, accelerator) -> None:
        """The backward pass of the scaled loss (a per-sample clipping objective replaces it)."""
        accelerator.backward(loss)

    def on_step_begin(self, step: int) -> None:
        """Before an optimizer step's first micro-batch (`step`: steps done so far)."""

    def on_step_end(self, step: int) -> dict[str, float]:
        """After the optimizer step `step` (1-based); returns extra values to log."""
        return {}

    def on_train_end(self, model, adapter_dir: Path) -> None:
        """On every rank, with the final weights: write what a later run needs beside the adapter (main rank)."""

    def summary(self) -> dict:
        """What the adapter's manifest (dstune_train.json) records of this objective, e.g. where it started."""
        return {}

    def state_dict(self) -> dict:
        """Everything a resumed run needs (tensors, numbers, strings, nested lists and dicts)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
