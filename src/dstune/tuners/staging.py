"""Staged activation of bottleneck adapters: layer groups switch on in turn, top layers first by default."""

from __future__ import annotations

import re

from .bottleneck import BottleneckLayer, StagesOptions, bottleneck_layers

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


class StageSwitch:
    """Turns adapter groups on at their configured start step or epoch (called before every optimizer step)."""

    def __init__(self, model, stages: StagesOptions):
        self.stages = stages
        self.groups = stage_groups(model, len(stages.starts), stages.order)
        self.active = -1

    def update(self, step: int, epoch: float) -> None:
        """Switch on the groups whose start is reached (`step`: optimizer steps done; `epoch`: epochs done)."""
        now = step if self.stages.unit == "steps" else epoch
        active = sum(start <= now for start in self.stages.starts)
        if active != self.active:
            self.active = active
            set_active_stages(self.groups, active)

    def all_on(self) -> None:
        """The saved model runs every adapter."""
        set_active_stages(self.groups, len(self.groups))
