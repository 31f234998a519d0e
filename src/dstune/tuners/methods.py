"""Adapters of any registered method: add one to a base model, check, load, switch and merge saved ones."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError, phase
from ..models.safety import PICKLE_SUFFIXES, check_pickle_file
from ..plugins import METHODS
from .lora import keep_moe_targets
from .prefix import prefix_task_adapters


def add_method(model, train):
    """Wrap a base model with a fresh adapter of the recipe's PEFT method (a plugin of dstune.plugins.METHODS)."""
    return METHODS[train.method].add(model, train.options(train.method), train)


def ensure_peft_methods() -> None:
    """Let peft load the adapters of every registered method (dstune's own peft methods register on demand)."""
    for method in METHODS.values():
        method.ensure_peft()


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


@phase("loading the adapter")
def load_adapters(model, adapters: dict[str, str | Path], is_trainable: bool = False):
    """Load one or more named peft adapters (any registered method) onto a base model; the first is active.

    A multi-task prefix folder (shared + task prefixes) loads as one entry; its parts keep their saved names.
    """
    from peft import PeftModel

    from .prefix_model import as_prefix_model

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
    ensure_peft_methods()
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
    """Whether the active adapter can be folded into the base weights (LoRA, DoRA, IA3: peft's own merges)."""
    from peft.utils import PeftType

    return peft_model.active_peft_config.peft_type in {PeftType.LORA, PeftType.IA3}
