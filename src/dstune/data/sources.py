"""Data sources as plugins (dstune.plugins.SOURCES): each turns its options into train/dev/test samples.

A source is one class with an optional `options` class, the recipe section `data.<name>`:

    from dstune.config import StrictModel
    from dstune.data.sources import Source
    from dstune.plugins import SOURCES

    class MyOptions(StrictModel):            # the recipe section data.my_source
        size: int = 100

    @SOURCES.register("my_source")
    class MySource(Source):
        options = MyOptions
        def build(self, options, data, log): ...   # -> ({"train": samples, "dev": ..., "test": ...}, stats)

`files` (dstune's own) reads train/dev/test files; the ICD-10-CM demo is a domain plugin (dstune.domains.icd10);
packages add theirs through the `dstune.sources` entry point group.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from ..config import DataConfig, StrictModel
from ..errors import InputError
from ..plugins import SOURCES
from .formats import RecordError, to_sample
from .quality import DropLog
from .readers import data_files, read_records

Splits = dict[str, Iterable[dict]]
# The function form `register_source` still takes: (data section, drop log) -> (samples per split, stats).
SourceFn = Callable[[DataConfig, DropLog], tuple[Splits, dict]]


class Source:
    """A data source plugin; subclasses set `options` (or leave None: no recipe section) and implement `build`."""

    # The pydantic class of the recipe section `data.<name>`; None: the source has no options.
    options: type[StrictModel] | None = None

    def build(self, options, data: DataConfig, log: DropLog) -> tuple[Splits, dict]:
        """Samples per split and stats for the data manifest.

        A sample is `{"id", "messages" (or raw "text"), "meta"}` (dstune.data.formats.to_sample makes one from any
        record form); each split is an iterable (a generator streams: memory stays flat). `log.seen(split, n)`
        counts what a split received; records dropped before their split is known count under "unsplit".
        """
        raise NotImplementedError

    def check(self, options, data: DataConfig) -> None:
        """Refuse what the recipe alone shows to be wrong (a missing file), before any stage runs: raise InputError."""


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


@SOURCES.register("files")
class FilesSource(Source):
    """Stream train/dev/test files (JSONL, JSON, CSV, Parquet, or folders): messages, Alpaca, ShareGPT or text."""

    def check(self, options, data: DataConfig) -> None:
        if not data.train_file:
            raise InputError("data.train_file: required when data.source is 'files'")
        for split in ("train", "dev", "test"):
            if getattr(data, f"{split}_file"):
                data_files(getattr(data, f"{split}_file"))
        reference = data.adversarial.reference
        if reference in ("dev", "test") and not getattr(data, f"{reference}_file"):
            raise InputError(f"data.adversarial.reference: {reference!r} is the {reference} split, and "
                             f"data.{reference}_file is not set; give that file, or a reference file")

    def build(self, options, data: DataConfig, log: DropLog) -> tuple[Splits, dict]:
        self.check(options, data)
        paths = {s: getattr(data, f"{s}_file") for s in ("train", "dev", "test") if getattr(data, f"{s}_file")}
        splits = {split: file_samples(path, split, log, data.fields) for split, path in paths.items()}
        return splits, {"files": paths}


class _FunctionSource(Source):
    """A source registered as a plain function of (data section, drop log), without options."""

    def __init__(self, build: SourceFn):
        self.function = build

    def build(self, options, data: DataConfig, log: DropLog) -> tuple[Splits, dict]:
        return self.function(data, log)


DATA_SOURCES = SOURCES  # the registry's name before sources became plugins


def register_source(name: str, source: Source | type[Source] | SourceFn) -> None:
    """Add a data source (a Source, or a function of (data section, drop log)); recipes pick it with `data.source`."""
    len(SOURCES)  # load dstune's own sources first, so that a source of the same name replaces them
    if not isinstance(source, Source) and not (isinstance(source, type) and issubclass(source, Source)):
        source = _FunctionSource(source)
    SOURCES.register(name, source)


def source_options(data: DataConfig) -> tuple[Source, object]:
    """The recipe's data source (`data.source`) and its options section."""
    source = SOURCES[data.source]
    options = data.options(data.source)
    if options is None and source.options is not None:  # a DataConfig built without the plugins' sections
        options = source.options()
    return source, options


def build_source(data: DataConfig, log: DropLog) -> tuple[Splits, dict]:
    """Run the recipe's data source with its options section."""
    source, options = source_options(data)
    return source.build(options, data, log)
