"""Data sources: each turns a DataConfig into train/dev/test samples (chat `messages`, or raw `text`)."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from ..config import DataConfig
from ..errors import InputError
from .formats import RecordError, to_sample
from .icd10 import build_icd10
from .quality import DropLog
from .readers import read_records

# A source returns an iterable of samples per split (a generator streams: memory stays flat) and its stats.
SourceFn = Callable[[DataConfig, DropLog], tuple[dict[str, Iterable[dict]], dict]]


def file_samples(path: str, split: str, log: DropLog, fields: dict[str, str]) -> Iterator[dict]:
    """The samples of a file or folder; unreadable and malformed records are counted in the log."""
    for raw in read_records(path):
        log.seen(split)
        if raw.reason:
            log.drop(split, raw.reason, raw.location, raw.detail)
            continue
        try:
            yield to_sample(raw.record, raw.location, fields)
        except RecordError as exc:
            log.drop(split, exc.reason, raw.location, str(exc))


def build_files(config: DataConfig, log: DropLog) -> tuple[dict[str, Iterable[dict]], dict]:
    """Stream train/dev/test files (JSONL, JSON, CSV, Parquet, or folders): messages, Alpaca, ShareGPT or text."""
    if not config.train_file:
        raise InputError("data.train_file: required when data.source is 'files'")
    paths = {s: getattr(config, f"{s}_file") for s in ("train", "dev", "test") if getattr(config, f"{s}_file")}
    splits = {split: file_samples(path, split, log, config.fields) for split, path in paths.items()}
    return splits, {"files": paths}


DATA_SOURCES: dict[str, SourceFn] = {"files": build_files, "icd10": build_icd10}


def register_source(name: str, build: SourceFn) -> None:
    """Add a data source to the registry (recipes pick it with `data.source`)."""
    DATA_SOURCES[name] = build
