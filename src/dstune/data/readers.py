"""Stream raw records out of JSONL, JSON, CSV and Parquet files (or folders of them), with their location.

Readers never raise on a bad record: they yield it with a reason, so the quality stage can count it (or, with
`data.quality.strict`, stop on it with its file:line).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..errors import InputError


@dataclass
class RawRecord:
    """One input record, or the reason it could not be read; `location` is file:line (or file:row)."""

    location: str
    record: dict | None = None
    reason: str | None = None
    detail: str = ""


def read_jsonl_records(path: Path) -> Iterator[RawRecord]:
    """One record per line; the file is streamed, so memory stays flat."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield RawRecord(where, reason="invalid_utf8", detail="not valid UTF-8")
                continue
            try:
                yield RawRecord(where, json.loads(text))
            except json.JSONDecodeError as exc:
                yield RawRecord(where, reason="malformed_json", detail=f"not valid JSON ({exc.msg})")


def read_json_records(path: Path) -> Iterator[RawRecord]:
    """A JSON array of records (read whole: use JSONL for large files)."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: a .json data file must hold an array of records")
    for index, record in enumerate(data):
        yield RawRecord(f"{path}[{index}]", record)


def read_csv_records(path: Path) -> Iterator[RawRecord]:
    """A header row, then one record per row; the location is the row's first line in the file."""
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        line = reader.line_num + 1
        try:
            for row in reader:
                yield RawRecord(f"{path}:{line}", {k: v for k, v in row.items() if k is not None and v != ""})
                line = reader.line_num + 1
        except UnicodeDecodeError:
            yield RawRecord(f"{path}:{line}", reason="invalid_utf8", detail="not valid UTF-8 (rest of file skipped)")


def read_parquet_records(path: Path) -> Iterator[RawRecord]:
    """Rows in batches through pyarrow, so memory stays flat."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield RawRecord(f"{path}#row{row}", record)
            row += 1


READERS: dict[str, Callable[[Path], Iterator[RawRecord]]] = {
    ".jsonl": read_jsonl_records, ".json": read_json_records, ".csv": read_csv_records,
    ".parquet": read_parquet_records,
}


def data_files(path: str | Path) -> list[Path]:
    """The data files a path names (itself, or a folder's in name order); one-line errors when there are none."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in READERS)
        if not files:
            raise InputError(f"{path}: no data files ({', '.join(READERS)}) in this folder")
        return files
    if not path.is_file():
        raise InputError(f"{path}: data file not found")
    if path.suffix not in READERS:
        raise InputError(f"{path}: unsupported data file type; use one of {', '.join(READERS)}")
    return [path]


def read_records(path: str | Path) -> Iterator[RawRecord]:
    """Every record of a file, or of the data files of a folder in name order."""
    for file in data_files(path):
        yield from READERS[file.suffix](file)
