"""`train.init_adapter`: continue an existing adapter instead of a fresh one (a data refresh, the next domain).

The recipe's method builds its adapter as usual; the saved weights then replace the fresh ones, which they must
match tensor for tensor (same method, rank, targets). Settings that change the adapter's output without changing a
shape (LoRA's alpha, rsLoRA, DoRA) must match too, or the run would start from another function than the one saved.
The new adapter's manifest records the parent, and the parent's own parent, so runs form a chain.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError

# adapter_config.json keys whose difference changes the adapter's output without changing any tensor's shape.
SAME_OUTPUT_KEYS = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "num_virtual_tokens", "fan_in_fan_out")


def load_initial_adapter(model, path: str | Path) -> dict:
    """Copy the weights of the adapter folder `path` into `model`'s fresh adapter; return the parent record."""
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    path = Path(path)
    saved = json.loads((path / "adapter_config.json").read_text())
    ours = model.peft_config[model.active_adapter].to_dict()
    for key in SAME_OUTPUT_KEYS:
        if key in saved and key in ours and _plain(saved[key]) != _plain(ours[key]):
            raise InputError(f"train.init_adapter: {path} was trained with {key}={_plain(saved[key])!r}, this "
                             f"recipe builds {key}={_plain(ours[key])!r}; set the recipe to match")
    weights = load_peft_weights(str(path), device="cpu")
    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        example = (missing or unexpected or shapes)[0]
        what = "lacks" if missing else "has an extra" if unexpected else "has another shape for"
        raise InputError(f"train.init_adapter: {path} does not fit this recipe's {saved.get('peft_type', '?')} "
                         f"adapter: it {what} {example} ({len(missing)} missing, {len(unexpected)} extra, "
                         f"{len(shapes)} of another shape); same train.method, rank and targets are needed")
    set_peft_model_state_dict(model, weights)
    return parent_record(path)


def parent_record(path: Path) -> dict:
    """Where the starting adapter came from: its folder, its run's recipe name and its own parent (a chain)."""
    record = {"adapter": str(path.resolve())}
    try:
        manifest = json.loads((path / "dstune_train.json").read_text())
    except (OSError, json.JSONDecodeError):
        return record  # an adapter not made by dstune: its folder is all there is
    recipe = (manifest.get("provenance") or {}).get("recipe") or {}
    record.update(run=recipe.get("name"), optimizer_steps=manifest.get("optimizer_steps"),
                  parent=manifest.get("parent"))
    return record


def _plain(value):
    return sorted(value) if isinstance(value, (list, set, tuple)) else value
