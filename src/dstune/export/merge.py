"""Merge a LoRA adapter into its base: a plain HF directory with zero inference overhead."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import phase
from ..provenance import provenance


@phase("merging the adapter")
def merge_adapter(peft_model, tokenizer, out_dir: Path, recipe) -> Path:
    """Fold the active adapter into the base weights; save a safetensors HF directory with the recipe's provenance."""
    merged = peft_model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    manifest = {"stage": "merge", "format": "hf-merged", "provenance": provenance(recipe)}
    (out_dir / "dstune_export.json").write_text(json.dumps(manifest, indent=2))
    return out_dir
