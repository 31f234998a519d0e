"""ONNX export through onnxruntime-genai's model builder, and a wrapper dstune's generation loop can drive.

The builder writes model.onnx (+ model.onnx.data): a decoder with GroupQueryAttention and a KV cache, for the CPU
execution provider; genai_config.json; and the tokenizer files. Llama and Qwen2 architectures only (the ones tested).
- fp32: the weights as they are; greedy decoding matches PyTorch's token for token.
- int8, int4: the builder's own precisions (int8 is `precision="int8"` in 0.18, not an extra option): weight-only
  MatMulNBits, block-wise (one scale per 64 or 16 weights of a column), activations quantized to int8 inside the
  kernel (accuracy_level 4, the builder's CPU default).
- int8 also gets an int8 embedding (`quantize_embedding`): the builder writes int8 MatMuls but leaves the embedding
  Gather in fp32, so dstune swaps it for onnxruntime's GatherBlockQuantized over the LM head's own int8 weight when
  the two are tied (SmolLM2), or over an int8 copy of the table when they are not.
Measured on the demo's tuned SmolLM2-135M-Instruct (size of the weights against fp32's 538 MB; the test split's
exact match against the fp32 model's 0.760, 300 descriptions; greedy decode tokens/s on 2 cores, 2 threads):
- int8, block 64, int8 embedding shared with the LM head: 27.0%, exact match 0.767 (95.3% identical answers),
  95 tok/s. Block 32: 28.6%, 0.770 (97.3%), 85 tok/s. Block 32 with the builder's fp32 embedding: 49.6%, 0.757.
  Block 128 pads the 576-wide rows to 640 (K must fill whole blocks): 28.5%, larger than block 64. Scales are fp32
  (the activations' type), so with 576-wide rows int8 cannot go below ~26.6% of fp32 in MatMulNBits.
  accuracy_level 1 (fp32 activations) gained 1.7 points of teacher-forced agreement but ran at 2 tok/s.
- int4, block 16, the llama.cpp "mixed" layers (first and last eighth, every third qkv/v/down) in int8 and the
  embedding in int4: 21.1%, exact match 0.710 (retention 0.934), 85 tok/s. Teacher-forced argmax agreement with
  fp32 on 6 prompts: 82.4%; plain int4 block 32: 71.3%; block 16: 79.2%. k_quant rounding with those mixed layers
  reached 86.0% at 25%, but took 8x longer to build and leaves untied embeddings fp32.
  QAT (`train.qat: {scheme: int4, group_size: 16}`) lifts the int4 export's retention from 0.891 to 0.968
  (bench/results/qat.json).
- int4-gptq, int4-awq, int4-awq-gptq: the int4 graph above with calibrated rounding (dstune.export.onnx_calibrated),
  calibrated on the recipe's train split: same bytes and layout. On the demo's tuned model: retention 0.973 (gptq),
  0.892 (awq) and 0.955 (awq-gptq) against round-to-nearest's 0.883; decode 8.3x HF fp32 for gptq and 7.7x for
  int4 in one bench/decode.py --quick run (docs/deploy.md).
- int4-mixed, int4-gptq-mixed: every decoder matmul int4 except the most loss-sensitive ones, int8 within
  export.int4_max_size of fp32's bytes (dstune.export.sensitivity), RTN or GPTQ on the rest.
- int4-rtn: the builder's int4 above. int4 itself, through `dstune export` or export.formats, writes every int4
  scheme and keeps the best on the dev split (export.artifacts.select_scheme); called directly it is int4-rtn.
- int4-ort-hqq, int4-ort-kquant: onnxruntime's own quantizer on the fp32 graph (dstune.export.onnx_ort), for
  comparison: asymmetric, fp32 embedding, larger.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DstuneError, InputError
from ..plugins import EXPORTS
from .formats import ExportFormat

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
# Calibrated int4 (dstune.export.onnx_calibrated): the int4 graph, with these steps around the builder.
# "mixed": the builder writes every decoder matmul in int4, and the most loss-sensitive ones become int8 within
# export.int4_max_size (dstune.export.sensitivity) instead of the builder's fixed llama.cpp layers.
CALIBRATED = {"int4-gptq": ("gptq",), "int4-awq": ("awq",), "int4-awq-gptq": ("awq", "gptq"),
              "int4-mixed": ("mixed",), "int4-gptq-mixed": ("mixed", "gptq")}
# int4 through `dstune export` / export.formats is a choice (AUTO): every int4 scheme is written, the best on the dev
# split is kept. Called directly, export_onnx(..., "int4") writes the builder's round-to-nearest, as int4-rtn does.
AUTO = {"int4": ("int4-gptq-mixed", "int4-gptq", "int4-awq-gptq", "int4-mixed", "int4-awq", "int4-rtn")}
# onnxruntime's own int4 algorithms on the builder's fp32 graph (dstune.export.onnx_ort), measured for comparison.
ORT_QUANTS = ("int4-ort-hqq", "int4-ort-kquant")
QUANTS = ("fp32", "int8", "int4", "int4-rtn", *CALIBRATED, *ORT_QUANTS)
# The int4 MatMulNBits block along the input dimension, which QAT emulates by default (dstune.train.qat).
INT4_BLOCK_SIZE = 16
# The builder's --extra_options per precision; numbers in the module docstring.
BUILDER_OPTIONS = {
    "fp32": {},
    "int8": {"block_size": "64", "accuracy_level": "4"},
    "int4": {"block_size": str(INT4_BLOCK_SIZE), "accuracy_level": "4", "op_types_to_quantize": "MatMul/Gather",
             "matmul_mixed_precision": "mixed_layers:int8"},
}


def builder_precision(quant: str) -> str:
    """The builder's precision (a key of BUILDER_OPTIONS) of a quant: a calibrated int4 is built as int4, and
    onnxruntime's own int4 algorithms start from fp32."""
    if quant in ORT_QUANTS:
        return "fp32"
    return "int4" if quant in CALIBRATED or quant == "int4-rtn" else quant


def builder_options(quant: str) -> dict[str, str]:
    """The builder's extra options for a quant: its precision's, without the fixed int8 layers when dstune places
    them by measured sensitivity."""
    options = dict(BUILDER_OPTIONS[builder_precision(quant)])
    if "mixed" in CALIBRATED.get(quant, ()):
        del options["matmul_mixed_precision"]
    return options


def _check_architecture(merged_dir: Path) -> None:
    config = json.loads((merged_dir / "config.json").read_text())
    architecture = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    if architecture not in ARCHITECTURES:
        raise InputError(f"{merged_dir}: ONNX export supports {' and '.join(ARCHITECTURES)}, not {architecture!r}")


@contextlib.contextmanager
def _logging_to(stream):
    """Send log records to `stream` for a while, then put the root logger back as it was.

    onnxruntime's quantizer calls logging.basicConfig(level=INFO) when imported, which would print every node it
    visits to stderr (and leave the root logger at INFO for the rest of the process). With a handler already in
    place, basicConfig does nothing.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = [logging.StreamHandler(stream)]
    try:
        yield
    finally:
        root.handlers = handlers
        root.setLevel(level)


def export_onnx(merged_dir: Path, out_dir: Path, quant: str, calibration=None) -> Path:
    """Write an onnxruntime-genai model folder (model.onnx, genai_config.json, tokenizer) of a merged HF directory.

    Calibrated quants (CALIBRATED) need `calibration`, a dstune.export.calibrate.Calibration of the train split.
    """
    import onnxruntime_genai

    merged_dir, out_dir = Path(merged_dir).resolve(), Path(out_dir).resolve()
    _check_architecture(merged_dir)
    calibrated = quantizer = None
    if quant in CALIBRATED:
        if calibration is None:
            raise InputError(f"onnx:{quant} is calibrated and needs calibration samples (dstune export passes the "
                             "recipe's train split)")
        from .onnx_calibrated import calibrated_export

        calibrated = calibrated_export(merged_dir, out_dir, CALIBRATED[quant], calibration, INT4_BLOCK_SIZE,
                                       lambda source: _build(source, out_dir, quant))
    else:
        _build(merged_dir, out_dir, quant)
    if quant in ORT_QUANTS:
        from .onnx_ort import ort_quantize

        bar = tqdm(total=1, desc=f"quantizing onnx:{quant}", unit=" model", disable=None)
        with (out_dir / "quantizer.log").open("w") as log, bar:
            quantizer = ort_quantize(out_dir, quant, log)
            bar.update()
    embedding = quantize_embedding(out_dir, int(BUILDER_OPTIONS[quant]["block_size"])) if quant == "int8" else None
    (out_dir / "dstune_onnx.json").write_text(json.dumps({
        "embedding": embedding, "calibration": calibrated, "quantizer": quantizer,
        "format": "onnx", "quant": quant, "source": str(merged_dir), "execution_provider": "cpu",
        "builder_options": builder_options(quant),
        "onnxruntime_genai": onnxruntime_genai.__version__,
    }, indent=2))
    return out_dir


def _build(merged_dir: Path, out_dir: Path, quant: str) -> None:
    """Run onnxruntime-genai's model builder on a merged HF directory, its output logged to out_dir/builder.log."""
    import huggingface_hub

    try:
        # Importing the builder also puts its own folder on sys.path (it imports `builders`, `quantization`).
        from onnxruntime_genai.models.builder import create_model, parse_extra_options
    except ImportError as exc:  # onnxruntime-genai does not declare the builder's dependencies (onnx-ir)
        raise DstuneError(f"ONNX export needs {exc.name!r}, which onnxruntime-genai's model builder imports "
                          f"(pip install {(exc.name or 'onnx-ir').replace('_', '-')})") from exc
    precision = builder_precision(quant)
    options = {**builder_options(quant), "hf_token": "false", "hf_remote": "false"}
    out_dir.mkdir(parents=True, exist_ok=True)
    # Offline mode turns any hub request the builder might make into an error instead of a download.
    offline = mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # The builder prints and draws a progress line per tensor it saves (hundreds): all of it goes to builder.log,
    # and the user sees one bar for the stage.
    bar = tqdm(total=1, desc=f"building onnx:{quant}", unit=" model", disable=None)
    with tempfile.TemporaryDirectory() as cache_dir, offline, (out_dir / "builder.log").open("w") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), _logging_to(log), bar:
        try:
            extra = parse_extra_options(None, str(merged_dir), str(out_dir), precision, "cpu", cache_dir,
                                        [f"{k}={v}" for k, v in options.items()])
            create_model(None, str(merged_dir), str(out_dir), precision, "cpu", cache_dir, **extra)
        except Exception as exc:  # the builder raises bare Exceptions, ValueErrors and ORT errors alike
            raise DstuneError(f"ONNX export of {merged_dir} failed in onnxruntime-genai's builder: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        bar.update()


def _symmetric_int8_blocks(table: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' int8 layout of a [rows, cols] table: uint8 codes (zero point 128) and one fp32 scale per block."""
    blocks = _pad_blocks(table, block)
    scales = np.abs(blocks).max(-1) / 127.0
    scales[scales == 0] = 1.0
    codes = np.clip(np.rint(blocks / scales[..., None]), -127, 127) + 128
    return codes.astype(np.uint8).reshape(len(table), -1), scales.astype(np.float32)


def quantize_embedding(folder: Path, block: int) -> dict | None:
    """Replace an int8 export's fp32 embedding Gather with an int8 GatherBlockQuantized (onnxruntime's contrib op).

    The builder quantizes embeddings to int4 only, so its int8 graph keeps the whole [vocab, hidden] table in fp32
    (21% of SmolLM2-135M's weights, half of the int8 export's bytes). Tied embeddings (SmolLM2, most small models)
    then read the LM head's int8 MatMulNBits weight itself, reshaped to [vocab, hidden]: one copy of the table on
    disk, and lookups that equal the LM head's dequantized rows exactly. An untied table is quantized here to the
    same layout (symmetric, blocks of `block` along hidden, zero point 128). Returns what was done, or None when
    the graph has no fp32 embedding Gather.
    """
    import onnx_ir as ir

    path = folder / "model.onnx"
    model = ir.load(path)
    graph = model.graph
    gather = next((n for n in graph if n.op_type == "Gather" and n.inputs[0] is not None
                   and n.inputs[0].is_initializer() and n.inputs[1] is not None
                   and n.inputs[1].is_graph_input()), None)
    if gather is None:
        return None
    table = gather.inputs[0]
    vocab, hidden = table.shape.dims
    head = next((n for n in graph if n.op_type == "MatMulNBits" and n.outputs[0].is_graph_output()
                 and n.attributes["N"].value == vocab and n.attributes["K"].value == hidden
                 and n.attributes["bits"].value == 8 and n.attributes["block_size"].value == block), None)
    padded = -(-hidden // block) * block
    values = table.const_value.numpy()  # read once: the tie check and an untied table's quantization both need it
    nodes = []
    if head is not None and _is_tied(head, values):
        shape = ir.Value(name=f"{gather.name}/int8_shape", const_value=ir.tensor(np.array([vocab, padded], np.int64)))
        graph.register_initializer(shape)
        reshape = ir.node("Reshape", [head.inputs[1], shape], name=f"{gather.name}/Reshape_int8")
        nodes.append(reshape)
        codes, scales, tied = reshape.outputs[0], head.inputs[2], True
    else:
        q, s = _symmetric_int8_blocks(values, block)
        codes = ir.Value(name=f"{table.name}_Q8", const_value=ir.tensor(q))
        scales = ir.Value(name=f"{table.name}_scales", const_value=ir.tensor(s))
        graph.register_initializer(codes)
        graph.register_initializer(scales)
        tied = False
    lookup = ir.node("GatherBlockQuantized", [codes, gather.inputs[1], scales], domain="com.microsoft",
                     attributes={"bits": 8, "block_size": block, "gather_axis": 0, "quantize_axis": 1},
                     name=f"{gather.name}BlockQuantized")
    nodes.append(lookup)
    output = lookup.outputs[0]
    if padded != hidden:  # the padding columns of the last block
        bounds = [ir.Value(name=f"{gather.name}/int8_slice_{k}", const_value=ir.tensor(np.array([v], np.int64)))
                  for k, v in (("start", 0), ("end", hidden), ("axis", -1))]
        for value in bounds:
            graph.register_initializer(value)
        nodes.append(ir.node("Slice", [output, *bounds], name=f"{gather.name}/Slice_int8"))
        output = nodes[-1].outputs[0]
    graph.insert_before(gather, nodes)
    output.dtype, output.shape = gather.outputs[0].dtype, gather.outputs[0].shape
    gather.outputs[0].replace_all_uses_with(output)
    graph.remove(gather, safe=True)
    del graph.initializers[table.name]
    if not any(opset == "com.microsoft" for opset in model.opset_imports):
        model.opset_imports["com.microsoft"] = 1
    save_in_place(model, folder, ".int8-embedding")
    return {"op": "GatherBlockQuantized", "bits": 8, "block_size": block, "tied": tied,
            "table": head.inputs[1].name if tied else codes.name}


def save_in_place(model, folder: Path, scratch: str) -> None:
    """Save an onnx_ir model over folder/model.onnx(.data) that it was loaded from."""
    import onnx_ir as ir

    # Written next to the old files, then moved over them: the tensors being saved are read from the old data file.
    tmp = folder / scratch
    tmp.mkdir(exist_ok=True)
    ir.save(model, tmp / "model.onnx", external_data="model.onnx.data")
    for name in ("model.onnx", "model.onnx.data"):
        (tmp / name).replace(folder / name)
    tmp.rmdir()


def _is_tied(head, table: np.ndarray) -> bool:
    """Whether the LM head's int8 weight is a quantization of the embedding table (checked on 64 rows).

    Tied: each dequantized value is within one quantization step of the table's (half a step from rounding, a
    whole one where the far end of a block is clamped to the code range). Untied weights are not.
    """
    vocab, hidden = table.shape
    rows = np.linspace(0, vocab - 1, 64).astype(np.int64)
    scales = head.inputs[2].const_value.numpy()[rows]
    codes = head.inputs[1].const_value.numpy()[rows].reshape(len(rows), scales.shape[1], -1).astype(np.float32)
    steps = np.abs(np.broadcast_to(scales[..., None], codes.shape)).reshape(len(rows), -1)[:, :hidden]
    dequantized = ((codes - 128) * scales[..., None]).reshape(len(rows), -1)[:, :hidden]  # padding codes are 0
    # onnxruntime's int8 blocks have scale = -m/128 (m: the value of largest magnitude), negative when m > 0.
    return bool((np.abs(dequantized - table[rows]) <= steps * 1.0001 + 1e-12).all())


def _pad_blocks(table: np.ndarray, block: int) -> np.ndarray:
    """[rows, cols] -> [rows, blocks, block], zero-padded."""
    return np.pad(table.astype(np.float32), ((0, 0), (0, -table.shape[1] % block))).reshape(table.shape[0], -1, block)


def files_fingerprint(folder: Path) -> str:
    """A hash of the ONNX graph, its genai config and a strided sample of each weight file."""
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted([*folder.glob("*.onnx*"), folder / "genai_config.json"]):
        size = path.stat().st_size
        digest.update(f"{path.name}{size}".encode())
        with path.open("rb") as handle:
            if size <= 1 << 24:
                digest.update(handle.read())
                continue
            # Reading every byte of a multi-GB file would cost more than most generations it saves.
            for offset in range(0, size, size // 1024):
                handle.seek(offset)
                digest.update(handle.read(4096))
    return digest.hexdigest()


def session_threads(config: dict, threads: int | None = None) -> int | None:
    """onnxruntime's intra-op threads: `threads`, else the artifact's own setting (None: keep it), else every CPU
    this process may use.

    Left to itself, onnxruntime-genai ran this 2-core machine's decoding on one thread: 50 tok/s where two give 95
    (SmolLM2-135M int8, docs/deploy.md). The artifact itself names no thread count: the machine it is deployed on decides.
    """
    if threads:
        return threads
    if "intra_op_num_threads" in config["model"]["decoder"].get("session_options", {}):
        return None
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class GenaiModel:
    """An onnxruntime-genai model with the part of a transformers model that dstune's generation loop uses."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime_genai as og

        self.path = Path(path)
        self.config = json.loads((self.path / "genai_config.json").read_text())
        settings = og.Config(str(self.path))
        # No built-in EOS: generate() stops on the caller's eos_token_id list, as transformers does.
        settings.overlay(json.dumps({"model": {"eos_token_id": []}}))
        self.threads = session_threads(self.config, threads)
        if self.threads:
            settings.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": self.threads}}}}))
        self.model = og.Model(settings)
        self.context_length = self.config["model"]["context_length"]
        self.device = torch.device("cpu")
        self.training = False
        self._fingerprint: str | None = None

    def train(self, mode: bool = True) -> GenaiModel:
        """Record the mode (the generation loop restores it); an ONNX model has no training behaviour."""
        self.training = mode
        return self

    def eval(self) -> GenaiModel:
        """Inference mode."""
        return self.train(False)

    def fingerprint(self) -> str:
        """The generation cache's model key: a hash of the ONNX files."""
        if self._fingerprint is None:
            self._fingerprint = files_fingerprint(self.path)
        return self._fingerprint

    def greedy(self, prompt: list[int], max_new_tokens: int, stops: set[int], min_new_tokens: int = 0) -> list[int]:
        """Greedy continuation of one unpadded prompt, ending with the first stop token if one comes."""
        import onnxruntime_genai as og

        max_length = min(len(prompt) + max_new_tokens, self.context_length)
        params = og.GeneratorParams(self.model)
        # min_length keeps the model's own EOS away until then (benchmarks time a fixed number of tokens).
        params.set_search_options(do_sample=False, max_length=max_length, min_length=len(prompt) + min_new_tokens)
        generator = og.Generator(self.model, params)
        generator.append_tokens(np.asarray([prompt], dtype=np.int32))
        new: list[int] = []
        while len(prompt) + len(new) < max_length and not generator.is_done():
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
            if new[-1] in stops:
                break
        return new

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20,
                 do_sample: bool = False, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, min_new_tokens: int = 0) -> torch.Tensor:
        """transformers-style greedy `generate` on a left-padded batch: [batch, prompt + new] token ids."""
        if do_sample:
            raise ValueError("GenaiModel.generate decodes greedily only (do_sample=False)")
        stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        pad = pad_token_id if pad_token_id is not None else min(stops, default=0)
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        # onnxruntime-genai's batched generator mishandles left padding (tests/export/test_onnx.py), so each row
        # runs alone, its padding stripped.
        rows = [self.greedy(ids[keep].tolist(), max_new_tokens, stops, min_new_tokens)
                for ids, keep in zip(input_ids, mask)]
        out = torch.full((len(rows), input_ids.shape[1] + max(map(len, rows), default=0)), pad, dtype=torch.long)
        out[:, :input_ids.shape[1]] = input_ids
        for i, row in enumerate(rows):
            out[i, input_ids.shape[1]:input_ids.shape[1] + len(row)] = torch.tensor(row, dtype=torch.long)
        return out


def load_onnx(artifact: Path, merged_dir: Path):
    """The exported model behind a GenaiModel, and the merged directory's tokenizer."""
    from ..models.loading import load_tokenizer

    return GenaiModel(artifact), load_tokenizer(Path(merged_dir))


EXPORTS.register("onnx", ExportFormat(
    name="onnx", quants=QUANTS, export=export_onnx, load=load_onnx, calibrated=tuple(CALIBRATED), auto=AUTO,
    description="ONNX Runtime GenAI (model builder): KV-cache decoder for CPU, fp32 or block-wise int8/int4 "
                "(int4: the best on dev of round-to-nearest, GPTQ, AWQ and sensitivity-placed int8 layers)",
))
