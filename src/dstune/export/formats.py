"""The registry of export formats: each turns a merged HF directory into a deployable artifact and loads it back.

`dstune export` runs an exporter, then scores what `load` returns on the same harness as the fp32 model
(evaluate_tiers): the domain metrics and the business completion rate. A loaded artifact is either a transformers
model (GGUF dequantized by transformers, torchao-quantized weights) or an object with the small part of that
interface the generation loop uses (`generate`, `eval`, `train`, `training`, `device`, `config`), such as the ONNX
Runtime GenAI wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import InputError


@dataclass(frozen=True)
class ExportFormat:
    """One deployable format and the quantizations it writes."""

    name: str
    quants: tuple[str, ...]
    description: str
    # (merged HF directory, output directory, quant) -> the artifact (a file or a folder)
    export: Callable[[Path, Path, str], Path]
    # (artifact, merged HF directory it came from) -> (model, tokenizer) for the evaluation harness
    load: Callable[[Path, Path], tuple[object, object]]


EXPORT_FORMATS: dict[str, ExportFormat] = {}
# Where the built-in formats live; each module registers itself when imported (only the one asked for is).
BUILTIN_MODULES = {"onnx": "dstune.export.onnx", "gguf": "dstune.export.gguf", "torchao": "dstune.export.torchao"}


def register_format(fmt: ExportFormat) -> ExportFormat:
    """Add a format to the registry (`dstune export --format NAME`)."""
    EXPORT_FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str, quant: str) -> ExportFormat:
    """The registered format `name`, checked to write `quant`; a one-line error otherwise."""
    import importlib

    if name not in EXPORT_FORMATS and name in BUILTIN_MODULES:
        importlib.import_module(BUILTIN_MODULES[name])
    if name not in EXPORT_FORMATS:
        known = sorted(set(EXPORT_FORMATS) | set(BUILTIN_MODULES))
        raise InputError(f"export format {name!r} is not one of: {', '.join(known)}")
    fmt = EXPORT_FORMATS[name]
    if quant not in fmt.quants:
        raise InputError(f"export format {name!r} writes {', '.join(fmt.quants)}, not {quant!r}")
    return fmt
