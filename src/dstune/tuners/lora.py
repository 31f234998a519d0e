"""LoRA through peft: build, load, switch and merge adapters."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..config import LoraConfigSection
from ..errors import InputError
from .targets import target_preset


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


def build_lora_config(model, options: LoraConfigSection):
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
    )


def add_lora(model, options: LoraConfigSection, adapter_name: str = "default"):
    """Wrap a base model with a fresh, trainable LoRA adapter (B = 0, so outputs start equal to the base)."""
    from peft import get_peft_model

    with keep_moe_targets():
        try:
            return get_peft_model(model, build_lora_config(model, options), adapter_name=adapter_name)
        except ValueError as exc:
            raise InputError(f"train.lora.targets: {str(exc).splitlines()[0]}") from None


def check_adapter_dir(path: Path) -> None:
    """Refuse adapter folders without safetensors weights (pickle files can run code)."""
    if not (path / "adapter_config.json").is_file():
        raise InputError(f"{path}: not a peft adapter folder (no adapter_config.json)")
    if not (path / "adapter_model.safetensors").is_file():
        pickles = [p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth"}]
        hint = f"; found {pickles[0]}, a pickle file dstune does not load" if pickles else ""
        raise InputError(f"{path}: no adapter_model.safetensors{hint}")


def load_adapters(model, adapters: dict[str, str | Path], is_trainable: bool = False):
    """Load one or more named peft adapters onto a base model; the first one is active."""
    from peft import PeftModel

    peft_model = None
    with keep_moe_targets():
        for name, path in adapters.items():
            path = Path(path)
            check_adapter_dir(path)
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(
                    model, path, adapter_name=name, is_trainable=is_trainable
                )
            else:
                peft_model.load_adapter(path, adapter_name=name, is_trainable=is_trainable)
    if peft_model is None:
        raise InputError("no adapter given")
    peft_model.set_adapter(next(iter(adapters)))
    return peft_model


def switch_adapter(peft_model, name: str) -> None:
    """Make the named adapter the active one."""
    if name not in peft_model.peft_config:
        raise InputError(f"adapter {name!r} is not loaded; loaded: {sorted(peft_model.peft_config)}")
    peft_model.set_adapter(name)
