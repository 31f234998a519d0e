"""Adapters of a running server: checked before loading (safetensors, servable types), loaded and unloaded by name."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError

# Prompt-learning adapters feed virtual tokens through the KV cache that continuous batching owns.
PROMPT_LEARNING = {"PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT"}


def check_servable(name: str, path: str | Path) -> Path:
    """The adapter folder, once it is known to load (safetensors, or a weights_only pickle when allowed) and serve."""
    from ..tuners.methods import check_adapters, prefix_task_adapters

    path = Path(path)
    check_adapters(path)
    peft_type = None
    if prefix_task_adapters(path) is None:
        try:
            peft_type = json.loads((path / "adapter_config.json").read_text()).get("peft_type")
        except (OSError, ValueError) as error:
            raise InputError(f"{path / 'adapter_config.json'}: unreadable ({error})") from None
    if peft_type is None or str(peft_type).upper() in PROMPT_LEARNING:
        raise InputError(f"adapter {name!r} ({path}): {str(peft_type or 'multi-task prefix').lower()} adapters are "
                         "not served by the torch engine (their virtual tokens live in the KV cache that continuous "
                         "batching manages); serve LoRA, DoRA, IA3 or bottleneck adapters, or a merged model")
    return path


def add_adapter(model, name: str, path: str | Path):
    """Load adapter `name` from `path` onto `model` (a base model or a peft model); returns the peft model."""
    from ..tuners.methods import ensure_peft_methods, load_adapters
    from ..tuners.lora import keep_moe_targets

    path = check_servable(name, path)
    if not hasattr(model, "peft_config"):
        return load_adapters(model, {name: path})
    if name in model.peft_config:
        raise InputError(f"adapter {name!r} is already loaded")
    ensure_peft_methods()
    with keep_moe_targets():
        try:
            model.load_adapter(path, adapter_name=name)
        except (ValueError, KeyError, RuntimeError) as error:
            raise InputError(f"adapter {name!r} ({path}) does not fit the served model: {error}") from None
    return model


def remove_adapter(model, name: str):
    """Unload adapter `name`; the last one leaves the bare base model. Returns the model to serve."""
    if not hasattr(model, "peft_config") or name not in model.peft_config:
        raise InputError(f"adapter {name!r} is not loaded")
    if len(model.peft_config) == 1:
        return model.unload()
    model.delete_adapter(name)
    return model
