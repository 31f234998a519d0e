"""The bottleneck adapter: dstune's own peft method (config, layer, model) and the `bottleneck` method plugin.

One name everywhere: the method `bottleneck`, its recipe section `train.bottleneck`, `BottleneckOptions`,
peft's `BottleneckConfig` and `PeftType.BOTTLENECK`, and the `bottleneck_` parameter prefix. (Recipes that say
`adapter`, its name before, still load, with a warning.) The peft parts load on first use, registering the method
with peft; validating a recipe does not import peft.
"""

from __future__ import annotations

import importlib
from typing import Literal

from pydantic import Field, field_validator

from ...config import StrictModel
from ...errors import InputError
from ...plugins import METHODS
from ..method import Method

_LAZY = {"BottleneckConfig": ".config", "parameters_per_adapter": ".config", "BottleneckLayer": ".layer",
         "BottleneckModel": ".model", "bottleneck_layers": ".model", "BOTTLENECK": ".peft_type"}
# Where a bottleneck adapter sits: Houlsby after attention and after the MLP, Pfeiffer after the MLP only.
PLACEMENTS = {"houlsby": ["self_attn", "mlp"], "pfeiffer": ["mlp"]}


class StagesOptions(StrictModel):
    """Staged activation of bottleneck adapters: layer groups switch on one after another."""

    # When each group switches on, in `unit`s; the first group is on from its start value.
    starts: list[int] = Field(min_length=1)
    unit: Literal["steps", "epochs"] = "steps"
    # top_down: the group of the top layers comes first (the seed's progressive fine-tuning).
    order: Literal["top_down", "bottom_up"] = "top_down"

    @field_validator("starts")
    @classmethod
    def _ascending(cls, value: list[int]) -> list[int]:
        if any(a > b for a, b in zip(value, value[1:])) or value[0] < 0:
            raise ValueError("must be non-negative and ascending, one start per stage")
        return value


class BottleneckOptions(StrictModel):
    """Bottleneck adapter options (the recipe section train.bottleneck)."""

    # Bottleneck width r: each adapter is d -> r -> d with a residual.
    r: int = Field(64, ge=1)
    activation: Literal["relu", "gelu", "silu"] = "relu"
    # houlsby: after attention and after the MLP; pfeiffer: after the MLP only.
    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    dropout: float = 0.0
    stages: StagesOptions | None = None


@METHODS.register("bottleneck")
class BottleneckMethod(Method):
    """Bottleneck MLPs after attention and/or the MLP (train.bottleneck), optionally switched on in stages."""

    options = BottleneckOptions
    # Houlsby et al. and AdapterHub's default for bottleneck adapters.
    default_learning_rate = 1e-4
    summary = "bottleneck MLPs after attention and/or the MLP"

    def __init__(self):
        self._stages = None

    def ensure_peft(self) -> None:
        importlib.import_module(".register", __name__)

    def add(self, model, options, train):
        from peft import TaskType, get_peft_model

        self.ensure_peft()
        from .config import BottleneckConfig

        config = BottleneckConfig(task_type=TaskType.CAUSAL_LM, r=options.r, activation=options.activation,
                                  dropout=options.dropout, target_modules=PLACEMENTS[options.placement])
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as exc:
            raise InputError(f"train.bottleneck.placement: {str(exc).splitlines()[0]}") from None
        self._stages = None
        if options.stages:
            from ..staging import StageSwitch

            self._stages = StageSwitch(peft_model, options.stages)
        return peft_model

    def on_step_begin(self, model, options, step, epoch) -> None:
        if self._stages is not None:
            self._stages.update(step, epoch)

    def on_train_end(self, model, options) -> None:
        if self._stages is not None:
            self._stages.all_on()


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module(".register", __name__)
    return getattr(importlib.import_module(_LAZY[name], __name__), name)
