"""Merge a LoRA adapter into its base: a plain HF directory with zero inference overhead."""

from __future__ import annotations

import json
from pathlib import Path


def merge_adapter(peft_model, tokenizer, out_dir: Path) -> Path:
    """Fold the active adapter into the base weights and save a safetensors HF directory."""
    merged = peft_model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "dstune_export.json").write_text(json.dumps({"stage": "merge", "format": "hf-merged"}, indent=2))
    return out_dir
