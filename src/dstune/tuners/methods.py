"""The PEFT method registry: `train.method` names one entry; loading and switching work the same for all."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import AdapterConfigSection, IA3ConfigSection, TrainConfig
from ..errors import InputError
from ..models.safety import PICKLE_SUFFIXES, check_pickle_file
from .bottleneck import BottleneckConfig
from .lora import add_lora, keep_moe_targets
from .prefix import add_prefix, as_prefix_model, prefix_task_adapters
from .targets import target_preset

# Where a bottleneck adapter sits: Houlsby after attention and after the MLP, Pfeiffer after the MLP only.
ADAPTER_PLACEMENTS = {"houlsby": ["self_attn", "mlp"], "pfeiffer": ["mlp"]}


@dataclass(frozen=True)
class Method:
    """One PEFT method: how to add it to a base model (whether it merges follows from its peft type)."""

    add: Callable  # (base model, TrainConfig) -> peft model
    summary: str


def add_ia3(model, options: IA3ConfigSection):
    """Wrap a base model with peft IA3 (learned rescaling vectors, initialised to one)."""
    from peft import IA3Config, TaskType, get_peft_model

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


def add_bottleneck(model, options: AdapterConfigSection):
    """Wrap a base model with dstune's bottleneck adapters (a registered peft method)."""
    from peft import TaskType, get_peft_model

    config = BottleneckConfig(task_type=TaskType.CAUSAL_LM, r=options.r, activation=options.activation,
                              dropout=options.dropout, target_modules=ADAPTER_PLACEMENTS[options.placement])
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise InputError(f"train.adapter.placement: {str(exc).splitlines()[0]}") from None


METHODS: dict[str, Method] = {
    "lora": Method(lambda m, t: add_lora(m, t.lora), "low-rank updates of the linear weights"),
    "dora": Method(lambda m, t: add_lora(m, t.lora, use_dora=True),
                   "LoRA on the direction, with a learned magnitude per output"),
    "ia3": Method(lambda m, t: add_ia3(m, t.ia3), "learned rescaling of keys, values and MLP inputs"),
    "prefix": Method(lambda m, t: add_prefix(m, t.prefix), "learned key/value prefixes in every layer"),
    "adapter": Method(lambda m, t: add_bottleneck(m, t.adapter),
                      "bottleneck MLPs after attention and/or the MLP"),
}


def add_method(model, train: TrainConfig):
    """Wrap a base model with a fresh adapter of the recipe's PEFT method."""
    return METHODS[train.method].add(model, train)


def check_adapter_dir(path: Path) -> None:
    """Refuse adapter folders without safetensors weights, unless pickles are allowed and pass weights_only."""
    if not path.is_dir():
        raise InputError(f"{path}: adapter folder not found")
    if not (path / "adapter_config.json").is_file():
        raise InputError(f"{path}: not a peft adapter folder (no adapter_config.json)")
    if (path / "adapter_model.safetensors").is_file():
        return
    if (path / "adapter_model.bin").is_file():  # the one pickle name peft reads
        check_pickle_file(path / "adapter_model.bin")
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    hint = f"; found {pickles[0]}, a name peft does not read (adapter_model.bin is)" if pickles else ""
    raise InputError(f"{path}: no adapter_model.safetensors{hint}")


def check_adapters(path: str | Path) -> None:
    """Check an adapter folder (each part of a multi-task prefix one) before a model spends time loading."""
    path = Path(path)
    for part in (prefix_task_adapters(path) or {"": path}).values():
        check_adapter_dir(part)


def load_adapters(model, adapters: dict[str, str | Path], is_trainable: bool = False):
    """Load one or more named peft adapters (any registered method) onto a base model; the first is active.

    A multi-task prefix folder (shared + task prefixes) loads as one entry; its parts keep their saved names.
    """
    from peft import PeftModel

    parts: dict[str, Path] = {}
    prefix_tasks: list[str] = []
    for name, path in adapters.items():
        path = Path(path)
        tasks = prefix_task_adapters(path)
        if tasks is None:
            parts[name] = path
        else:
            parts.update(tasks)
            prefix_tasks = list(tasks)[1:]
    peft_model = None
    with keep_moe_targets():
        for name, path in parts.items():
            check_adapter_dir(path)
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=is_trainable)
            else:
                peft_model.load_adapter(path, adapter_name=name, is_trainable=is_trainable)
    if peft_model is None:
        raise InputError("no adapter given")
    peft_model = as_prefix_model(peft_model)
    peft_model.set_adapter(next(iter(parts)))
    if prefix_tasks:
        peft_model.set_prefix_tasks(prefix_tasks)
    return peft_model


def switch_adapter(peft_model, name: str) -> None:
    """Make the named adapter the active one."""
    if name not in peft_model.peft_config:
        raise InputError(f"adapter {name!r} is not loaded; loaded: {sorted(peft_model.peft_config)}")
    peft_model.set_adapter(name)


def is_mergeable(peft_model) -> bool:
    """Whether the active adapter can be folded into the base weights (LoRA, DoRA, IA3)."""
    from peft.utils import PeftType

    return peft_model.active_peft_config.peft_type in {PeftType.LORA, PeftType.IA3}
