"""IA3 through peft: the `ia3` method (learned rescaling of keys, values and MLP inputs)."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from ..config import StrictModel
from ..errors import InputError
from ..plugins import METHODS
from .method import Method
from .targets import target_preset


class IA3Options(StrictModel):
    """peft IA3 options (the recipe section train.ia3)."""

    # "auto": keys, values and the MLP down-projection (inputs scaled) of the architecture's preset.
    targets: list[str] | Literal["auto"] = "auto"

    @field_validator("targets")
    @classmethod
    def _some_targets(cls, value):
        if not value:
            raise ValueError("name at least one module, or auto")
        return value


def add_ia3(model, options: IA3Options):
    """Wrap a base model with peft IA3 (learned rescaling vectors, initialised to one)."""
    from peft import IA3Config, TaskType, get_peft_model

    from .lora import keep_moe_targets

    if options.targets == "auto":
        preset = target_preset(getattr(model.config, "model_type", ""))
        if not (preset and preset.ia3_modules):
            raise InputError("train.ia3.targets: no preset for this architecture; list the modules to scale")
        targets, feedforward = preset.ia3_modules, preset.ia3_feedforward
    else:
        targets, feedforward = options.targets, []
    config = IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=feedforward)
    with keep_moe_targets():
        try:
            return get_peft_model(model, config)
        except ValueError as exc:
            raise InputError(f"train.ia3.targets: {str(exc).splitlines()[0]}") from None


@METHODS.register("ia3")
class IA3Method(Method):
    """Learned rescaling of keys, values and MLP inputs (train.ia3)."""

    options = IA3Options
    # The IA3 paper (T-Few) and PEFT's IA3 examples: its scaling vectors need a far larger step than LoRA.
    default_learning_rate = 3e-3
    summary = "learned rescaling of keys, values and MLP inputs"

    def add(self, model, options, train):
        return add_ia3(model, options)
