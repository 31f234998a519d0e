"""Staged activation of bottleneck adapters: layer groups switch on in turn, top layers first by default."""

from __future__ import annotations

import re

from transformers import TrainerCallback

from ..config import StagesSection
from .bottleneck import BottleneckLayer, bottleneck_layers

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def stage_groups(model, num_groups: int, order: str = "top_down") -> list[list[BottleneckLayer]]:
    """The model's bottleneck layers split into `num_groups` contiguous blocks of decoder layers, in stage order."""
    by_index: dict[int, list[BottleneckLayer]] = {}
    for name, layer in bottleneck_layers(model):
        match = _LAYER_INDEX.search(name + ".")
        by_index.setdefault(int(match.group(1)) if match else -1, []).append(layer)
    indices = sorted(by_index, reverse=order == "top_down")
    if num_groups > len(indices):
        raise ValueError(f"{num_groups} stages for {len(indices)} adapted layers")
    bounds = [round(i * len(indices) / num_groups) for i in range(num_groups + 1)]
    return [[layer for index in indices[lo:hi] for layer in by_index[index]] for lo, hi in zip(bounds, bounds[1:])]


def set_active_stages(groups: list[list[BottleneckLayer]], active: int) -> None:
    """Switch on the first `active` groups; the others are skipped in forward, so they get no gradient."""
    for position, group in enumerate(groups):
        for layer in group:
            layer.stage_on = position < active


class StagedActivationCallback(TrainerCallback):
    """Turns adapter groups on at their configured start step or epoch."""

    def __init__(self, model, stages: StagesSection):
        self.stages = stages
        self.groups = stage_groups(model, len(stages.starts), stages.order)
        self.active = -1

    def _update(self, state) -> None:
        now = state.global_step if self.stages.unit == "steps" else (state.epoch or 0.0)
        active = sum(start <= now for start in self.stages.starts)
        if active != self.active:
            self.active = active
            set_active_stages(self.groups, active)

    def on_train_begin(self, args, state, control, **kwargs):
        self._update(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._update(state)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._update(state)

    def on_train_end(self, args, state, control, **kwargs):
        set_active_stages(self.groups, len(self.groups))  # the saved model runs every adapter
