"""Data sources: each turns a DataConfig into train/dev/test records in `messages` form."""

from __future__ import annotations

from typing import Callable

from ..config import DataConfig
from ..errors import InputError
from .formats import read_jsonl
from .icd10 import build_icd10

SourceFn = Callable[[DataConfig], tuple[dict[str, list[dict]], dict]]


def build_files(config: DataConfig) -> tuple[dict[str, list[dict]], dict]:
    """Read train/dev/test JSONL files in messages, Alpaca or ShareGPT form."""
    if not config.train_file:
        raise InputError("data.train_file: required when data.source is 'files'")
    splits: dict[str, list[dict]] = {}
    for split in ("train", "dev", "test"):
        path = getattr(config, f"{split}_file")
        if path:
            splits[split] = [{"id": i, "messages": m, "meta": meta} for i, m, meta in read_jsonl(path)]
    # A bad line stops the stage (read_jsonl raises), so nothing is dropped here.
    return splits, {"files": {s: getattr(config, f"{s}_file") for s in splits}, "dropped": {}}


DATA_SOURCES: dict[str, SourceFn] = {"files": build_files, "icd10": build_icd10}


def register_source(name: str, build: SourceFn) -> None:
    """Add a data source to the registry (recipes pick it with `data.source`)."""
    DATA_SOURCES[name] = build
