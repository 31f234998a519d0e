"""The data stage: build the domain dataset folder (train/dev/test JSONL in messages form, plus a manifest)."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Recipe
from ..errors import InputError
from .sources import DATA_SOURCES

SPLITS = ("train", "dev", "test")


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Prepend the recipe's system prompt unless the conversation has its own."""
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def build_dataset(recipe: Recipe) -> Path:
    """Run the data source of the recipe and write the dataset folder; returns its path."""
    splits, stats = DATA_SOURCES[recipe.data.source](recipe.data)
    if not splits.get("train"):
        raise InputError(f"data.source={recipe.data.source!r}: produced no training samples")
    out = recipe.run_dir / "data"
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        path = out / f"{split}.jsonl"
        records = splits.get(split)
        if records is None:
            path.unlink(missing_ok=True)
            continue
        with path.open("w", encoding="utf-8") as handle:
            for record in records:
                record = {**record, "messages": with_system_prompt(record["messages"], recipe.data.system_prompt)}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        counts[split] = len(records)
    manifest = {"stage": "data", "source": recipe.data.source, "counts": counts, **stats}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    return out


def load_split(data_dir: Path, split: str) -> list[dict]:
    """Records of one split of a dataset folder (an empty list if the split is absent)."""
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
