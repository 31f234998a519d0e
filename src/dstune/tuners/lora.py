"""LoRA and DoRA through peft: the `lora` and `dora` methods, with per-architecture targets."""

from __future__ import annotations

import contextlib
from typing import Literal

from pydantic import Field

from ..config import StrictModel
from ..errors import InputError
from ..plugins import METHODS
from .method import Method
from .targets import target_preset


class LoraOptions(StrictModel):
    """peft LoRA options (the recipe sections train.lora and, for DoRA, also train.lora)."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, gt=0)
    # peft's default; on CPUs the dropout masks (one per adapted module) cost ~40% of the forward pass.
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # "auto" takes the preset of the model's architecture (see dstune.tuners.targets).
    targets: list[str] | Literal["auto", "all-linear"] = "auto"
    # DeepSeek-V3/MoE: also adapt the fused routed experts through peft `target_parameters`.
    routed_experts: bool = False
    # rsLoRA scales the update by alpha/sqrt(r) instead of alpha/r, which keeps large ranks learning.
    use_rslora: bool = False


LoraConfigSection = LoraOptions  # the name before methods became plugins


@contextlib.contextmanager
def keep_moe_targets():
    """Stop peft from rewriting `gate_proj/up_proj/down_proj` targets into fused-expert parameters.

    peft >= 0.18 remaps those names to `experts.gate_up_proj` on MoE models (a transformers v4 -> v5 shim). On
    DeepSeek-V3 the same names are the real `nn.Linear`s of the shared experts and dense MLPs, which then lose
    their LoRA; the routed experts are targeted explicitly through `target_parameters` instead.
    """
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:
        yield
        return
    saved = dict(conversion._MOE_FUSED_TARGETS)
    conversion._MOE_FUSED_TARGETS.clear()
    try:
        yield
    finally:
        conversion._MOE_FUSED_TARGETS.update(saved)


def build_lora_config(model, options: LoraOptions, use_dora: bool = False):
    """A peft LoraConfig for this model, with targets from the architecture preset when `auto`."""
    from peft import LoraConfig, TaskType

    model_type = getattr(model.config, "model_type", "")
    target_parameters = None
    if options.targets == "auto":
        preset = target_preset(model_type)
        targets = list(preset.modules) if preset else "all-linear"
        if options.routed_experts:
            if not (preset and preset.expert_parameters):
                raise InputError(f"train.lora.routed_experts: architecture {model_type!r} has no fused routed experts")
            if use_dora:
                raise InputError("train.method: DoRA cannot adapt fused routed experts; "
                                 "set train.lora.routed_experts=false or use lora")
            if options.dropout:
                raise InputError("train.lora.dropout: must be 0 with train.lora.routed_experts "
                                 "(peft's wrapper for fused expert parameters has no dropout)")
            target_parameters = list(preset.expert_parameters)
    else:
        targets = options.targets
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=targets,
        target_parameters=target_parameters,
        use_dora=use_dora,
        use_rslora=options.use_rslora,
    )


def add_lora(model, options: LoraOptions, adapter_name: str = "default", use_dora: bool = False):
    """Wrap a base model with a fresh, trainable LoRA (or DoRA) adapter; B = 0, so outputs start equal to the base."""
    from peft import get_peft_model

    with keep_moe_targets():
        try:
            config = build_lora_config(model, options, use_dora)
            return get_peft_model(model, config, adapter_name=adapter_name)
        except ValueError as exc:
            raise InputError(f"train.lora.targets: {str(exc).splitlines()[0]}") from None


@METHODS.register("lora")
class LoraMethod(Method):
    """Low-rank updates of the linear weights (train.lora)."""

    options = LoraOptions
    summary = "low-rank updates of the linear weights"
    fuses = True
    supports_qat = True
    # PEFT's LoRA examples and the QLoRA paper (1e-4 to 2e-4 for 7B-class models).
    default_learning_rate = 2e-4
    use_dora = False

    def check(self, train) -> None:
        if train.qat and train.lora.dropout > 0:
            raise ValueError("qat: a merged weight cannot drop the LoRA input; set train.lora.dropout to 0")

    def add(self, model, options, train):
        return add_lora(model, train.lora, use_dora=self.use_dora)


@METHODS.register("dora")
class DoraMethod(LoraMethod):
    """LoRA on the direction, with a learned magnitude per output; its options are train.lora's."""

    options = None  # shares train.lora
    summary = "LoRA on the direction, with a learned magnitude per output"
    supports_qat = False
    use_dora = True
