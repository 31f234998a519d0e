"""Export formats as plugins (dstune.plugins.EXPORTS): each turns a merged HF directory into a deployable artifact
and loads it back. dstune's own are onnx, gguf and torchao; packages add theirs through the `dstune.exports` entry
point group (an entry point names an ExportFormat).

`dstune export` runs an exporter, then scores what `load` returns on the same harness as the fp32 model
(evaluate_tiers): the domain metrics and the business completion rate. A loaded artifact is either a transformers
model (GGUF dequantized by transformers, torchao-quantized weights) or an object with the small part of that
interface the generation loop uses (`generate`, `eval`, `train`, `training`, `device`, `config`), such as the ONNX
Runtime GenAI wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import InputError
from ..plugins import EXPORTS


@dataclass(frozen=True)
class ExportFormat:
    """One deployable format and the quantizations it writes."""

    name: str
    quants: tuple[str, ...]
    description: str
    # (merged HF directory, output directory, quant) -> the artifact (a file or a folder); the quants named in
    # `calibrated` are also passed calibration=dstune.export.calibrate.Calibration (the train split's samples)
    export: Callable[..., Path]
    # (artifact, merged HF directory it came from) -> (model, tokenizer) for the evaluation harness
    load: Callable[[Path, Path], tuple[object, object]]
    calibrated: tuple[str, ...] = ()
    # A quant that stands for a choice among others (e.g. onnx's "int4": its calibrated and plain schemes): `dstune
    # export` writes them all, keeps the best on the dev split, and scores that one (export.artifacts.select_scheme)
    auto: dict[str, tuple[str, ...]] = field(default_factory=dict)


EXPORT_FORMATS = EXPORTS  # the registry's name before formats became plugins


def register_format(fmt: ExportFormat) -> ExportFormat:
    """Add a format to the registry (`dstune export --format NAME`); same as `EXPORTS.register(fmt.name, fmt)`."""
    len(EXPORTS)  # load the registered formats first, so that a format of the same name replaces them
    return EXPORTS.register(fmt.name, fmt)


def get_format(name: str, quant: str) -> ExportFormat:
    """The registered format `name`, checked to write `quant`; a one-line error otherwise."""
    if name not in EXPORTS:
        raise InputError(f"export format {name!r} is not one of: {', '.join(sorted(EXPORTS))}")
    fmt = EXPORTS[name]
    if quant not in fmt.quants:
        raise InputError(f"export format {name!r} writes {', '.join(fmt.quants)}, not {quant!r}")
    return fmt
