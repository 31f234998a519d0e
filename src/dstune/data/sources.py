"""Data sources: each turns a DataConfig into train/dev/test records in `messages` form."""

from __future__ import annotations

from typing import Callable

from ..config import DataConfig
from ..errors import InputError
from .formats import RecordError, to_sample
from .quality import DropLog
from .readers import read_records
from .icd10 import build_icd10

SourceFn = Callable[[DataConfig, DropLog], tuple[dict[str, list[dict]], dict]]


def build_files(config: DataConfig, log: DropLog) -> tuple[dict[str, list[dict]], dict]:
    """Read train/dev/test files (JSONL, JSON, CSV, Parquet, or folders) in messages, Alpaca or ShareGPT form."""
    if not config.train_file:
        raise InputError("data.train_file: required when data.source is 'files'")
    splits: dict[str, list[dict]] = {}
    for split in ("train", "dev", "test"):
        path = getattr(config, f"{split}_file")
        if not path:
            continue
        records = splits[split] = []
        for raw in read_records(path):
            log.seen(split)
            if raw.reason:
                log.drop(split, raw.reason, raw.location, raw.detail)
                continue
            try:
                records.append(to_sample(raw.record, raw.location))
            except RecordError as exc:
                log.drop(split, exc.reason, raw.location, str(exc))
    return splits, {"files": {s: getattr(config, f"{s}_file") for s in splits}}


DATA_SOURCES: dict[str, SourceFn] = {"files": build_files, "icd10": build_icd10}


def register_source(name: str, build: SourceFn) -> None:
    """Add a data source to the registry (recipes pick it with `data.source`)."""
    DATA_SOURCES[name] = build
