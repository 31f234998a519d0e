"""Prefix-Tuning: the `prefix` method and its options (the model itself is in prefix_model.py, which loads peft).

Names of prefix_model (PrefixCausalLM, add_prefix, as_prefix_model, ...) are importable from here; they load on
first use, so validating a recipe does not import peft.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ..config import StrictModel
from ..plugins import METHODS
from .method import Method

SHARED = "shared"
PREFIX_MANIFEST = "dstune_prefix.json"


class PrefixOptions(StrictModel):
    """peft Prefix-Tuning options, and the multi-task shared prefix (the recipe section train.prefix)."""

    # Virtual key/value positions per layer (per task, when `tasks` is set).
    num_virtual_tokens: int = Field(16, ge=1)
    # activations: start from the base model's own keys and values of real text (the training prompts), so
    # training starts at the base model's loss; random: peft's N(0, 1) init, which starts far above it.
    init: Literal["activations", "random"] = "activations"
    # Reparameterise the prefix through an MLP while training (Li & Liang); saved as plain prefixes.
    projection: bool = False
    projection_hidden: int = Field(512, ge=1)
    # Multi-task: a prefix of `shared_tokens` shared by all tasks, followed by each task's own prefix.
    tasks: list[str] = []
    shared_tokens: int = Field(16, ge=1)

    @field_validator("tasks")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("task names must be unique")
        return value


PrefixConfigSection = PrefixOptions  # the name before methods became plugins


def prefix_task_adapters(path: Path) -> dict[str, Path] | None:
    """The adapter folders of a saved multi-task prefix (shared first), or None for a plain adapter folder."""
    manifest = path / PREFIX_MANIFEST
    if not manifest.is_file():
        return None
    layout = json.loads(manifest.read_text())
    return {name: path / name for name in [layout["shared"], *layout["tasks"]]}


@METHODS.register("prefix")
class PrefixMethod(Method):
    """Learned key/value prefixes in every layer (train.prefix), optionally a shared prefix plus one per task."""

    options = PrefixOptions
    # PEFT's Prefix-Tuning examples (1e-2 to 3e-2).
    default_learning_rate = 1e-2
    summary = "learned key/value prefixes in every layer"
    packs = False
    packing_conflict = ("tuning prepends virtual tokens that every sample attends to, which a packed row cannot "
                        "share")

    def add(self, model, options, train):
        from .prefix_model import add_prefix

        return add_prefix(model, options)

    def sample_fields(self, options) -> tuple[str, ...]:
        return ("task",) if options.tasks else ()

    def before_training(self, model, options, train_samples, max_length) -> None:
        if options.init != "activations":
            return
        import torch

        # The keys and values of real training prompts, concatenated until every virtual token has one.
        text = [t for s in train_samples[:64] for t in s["input_ids"]]
        model.init_from_activations(torch.tensor(text[:4 * max_length]))

    def restore(self, model, checkpoint: Path, trainable: bool = True) -> None:
        tasks = getattr(model, "prefix_tasks", None)
        if trainable and not tasks and not model.active_peft_config.prefix_projection:
            return super().restore(model, checkpoint, trainable)
        # Saved prefixes are plain (a projection MLP is folded in on save): peft reloads them as they are, one
        # adapter per sub-folder for a multi-task prefix.
        parts = prefix_task_adapters(checkpoint) or {model.active_adapter: checkpoint}
        for name, folder in parts.items():
            model.load_adapter(folder, adapter_name=name, is_trainable=trainable)
        model.set_adapter(next(iter(parts)))
        if tasks:
            model.set_prefix_tasks(tasks)


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module(".prefix_model", __package__), name)
