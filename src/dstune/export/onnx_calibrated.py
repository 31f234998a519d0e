"""Calibrated int4 ONNX exports: the builder's int4 graph (same blocks, same int4 embedding and LM head), with AWQ
applied to the merged weights before it runs and GPTQ's codes written over its RTN ones.

- gptq, awq: only the rounding of the decoder layers' int4 MatMulNBits changes. Names, shapes and bytes stay the
  builder's (with its llama.cpp "mixed" int8 layers), so the export is as large and as fast as plain int4.
- mixed: the builder writes every decoder matmul in int4; dstune.export.sensitivity measures each one's loss
  increase on the calibration data and rewrites the most sensitive ones as int8 MatMulNBits (same block) while the
  weight bytes stay within `Calibration.max_size` of fp32's. The rest are then rounded by the scheme's other steps.
The LM head (tied to the embedding in SmolLM2) keeps RTN: rounding it with GPTQ would move the embedding lookups too.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import DstuneError
from .calibrate import Calibration
from .int4 import awq_transform, gptq_model

# The builder's int4 node of a decoder matmul -> the HF linears it holds (fused ones stacked along the output rows).
NODE_LINEARS = {
    "attn/qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn/q_proj": ("self_attn.q_proj",), "attn/k_proj": ("self_attn.k_proj",), "attn/v_proj": ("self_attn.v_proj",),
    "attn/o_proj": ("self_attn.o_proj",),
    "mlp/gate_proj": ("mlp.gate_proj",), "mlp/up_proj": ("mlp.up_proj",), "mlp/down_proj": ("mlp.down_proj",),
}
LAYER_NODE = re.compile(r"^/model/layers\.(\d+)/(\w+/\w+)/MatMul_Q4$")
GPTQ_PERCDAMP = 0.01


def calibrated_export(merged_dir: Path, out_dir: Path, scheme: tuple[str, ...], calibration: Calibration, block: int,
                      build: Callable[[Path], None]) -> dict:
    """Run `build` (the builder's int4 export of a merged directory) with the scheme's steps around it."""
    from transformers import AutoModelForCausalLM

    record = {"scheme": "+".join(scheme), "block_size": block, **calibration.manifest()}
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    source = merged_dir
    work = out_dir / ".calibrated-source"
    try:
        if "awq" in scheme:
            record["awq_alphas"] = awq_transform(model, calibration.samples, block)
            source = _saved_copy(model, merged_dir, work)
        build(source)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    nodes = int4_layer_nodes(out_dir / "model.onnx")
    if "mixed" in scheme:
        int8, mixed = _sensitive_nodes(model, merged_dir, out_dir, nodes, calibration, block,
                                       before=scheme[:scheme.index("mixed")])
        record.update(mixed)
        write_int8_weights(out_dir, {node: _stacked_weight(model, *nodes.pop(node)) for node in int8}, block)
    if "gptq" in scheme:
        only = {f"model.layers.{layer}.{name}" for layer, linears in nodes.values() for name in linears}
        codes = gptq_model(model, calibration.samples, block, GPTQ_PERCDAMP, only=only)
        write_int4_codes(out_dir, {node: _stacked(codes, layer, linears) for node, (layer, linears) in nodes.items()})
        record.update(gptq_nodes=sorted(nodes), percdamp=GPTQ_PERCDAMP)
    return record


def _sensitive_nodes(model, merged_dir: Path, out_dir: Path, nodes: dict, calibration: Calibration, block: int,
                     before: tuple[str, ...] = ()) -> tuple[list[str], dict]:
    """The int4 nodes to rewrite as int8, by measured sensitivity within the byte budget, and what to record.

    The scan is kept beside the exports (exports/.int4-sensitivity/), keyed by the merged weights, the samples, the
    block and the steps before it, so the other mixed schemes of one `--quant int4` choice reuse it.
    """
    from .artifacts import weight_bytes
    from .sensitivity import TOP_K, place, scan

    if calibration.max_size is None:
        raise DstuneError("mixed-precision int4 needs a size budget (Calibration.max_size, export.int4_max_size)")
    samples, labels = calibration.spread(calibration.scan_samples)
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(merged_dir).glob("*.safetensors"))
    key = hashlib.sha256(json.dumps([str(Path(merged_dir).resolve()), weights, calibration.manifest()["ids_sha256"],
                                     len(samples),
                                     block, TOP_K, list(before), sorted(nodes)]).encode()).hexdigest()[:16]
    cache = out_dir.parent / ".int4-sensitivity" / f"{key}.json"
    if cache.is_file():
        deltas = json.loads(cache.read_text())
    else:
        deltas = scan(model, samples, labels, block, nodes)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(deltas))
    fp32_bytes, int4_bytes = weight_bytes(merged_dir), weight_bytes(out_dir)
    budget = int(calibration.max_size * fp32_bytes) - int4_bytes
    if budget < 0:
        raise DstuneError(f"mixed-precision int4: the all-int4 graph is already {int4_bytes / fp32_bytes:.1%} of "
                          f"fp32's bytes, above export.int4_max_size={calibration.max_size}")
    # int8 codes take a byte per weight where int4 takes half of one; the scales stay (same blocks).
    placement = place(deltas, node_code_bytes(out_dir / "model.onnx", nodes), budget)
    return placement.int8, {
        "sensitivity": {"measure": f"KL(fp32 || one matmul in int4) per supervised token, top-{TOP_K} buckets",
                        "samples": len(samples), "cache": str(cache),
                        "delta_loss": {n: round(d, 8) for n, d in sorted(deltas.items(), key=lambda i: -i[1])}},
        "int8_nodes": placement.int8, "max_size": calibration.max_size, "int4_only_bytes": int4_bytes,
        "int8_extra_bytes": placement.extra_bytes, "budget_bytes": placement.budget_bytes,
    }


def node_code_bytes(path: Path, nodes) -> dict[str, int]:
    """Bytes of each named MatMulNBits node's packed weight (its B input), read from the graph's shapes."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    dims = {i.name: list(i.dims) for i in graph.initializer}
    return {n.name: int(np.prod(dims[n.input[1]])) for n in graph.node if n.name in nodes}


def _stacked_weight(model, layer: int, linears: tuple[str, ...]) -> torch.Tensor:
    """One node's float weight: its linears' stacked along the output rows, as the builder fuses them."""
    block = model.model.layers[layer]
    return torch.cat([block.get_submodule(name).weight.detach().float() for name in linears])


def write_int8_weights(folder: Path, weights: dict[str, torch.Tensor], block: int) -> None:
    """Rewrite the named 4-bit MatMulNBits nodes of folder/model.onnx as 8-bit ones (symmetric, zero point 128,
    the same blocks) of the given float weights [N, K]."""
    import onnx_ir as ir

    from .onnx import _symmetric_int8_blocks, save_in_place

    if not weights:
        return
    model = ir.load(folder / "model.onnx")
    found = set()
    for node in model.graph:
        if node.op_type != "MatMulNBits" or node.name not in weights:
            continue
        if node.attributes["block_size"].value != block or len(node.inputs) > 3 and node.inputs[3] is not None:
            raise DstuneError(f"mixed-precision int4: {node.name} is not a symmetric {block}-wide int4 node")
        codes, scales = _symmetric_int8_blocks(weights[node.name].numpy(), block)
        b, s = node.inputs[1], node.inputs[2]
        rows = codes.shape[0]
        b.const_value = ir.tensor(codes.reshape(rows, -1, block), name=b.name)
        b.shape = ir.Shape([rows, codes.shape[1] // block, block])
        s.const_value = ir.tensor(scales.reshape(s.shape.dims), name=s.name)
        node.attributes["bits"] = ir.AttrInt64("bits", 8)
        found.add(node.name)
    if found != set(weights):
        raise DstuneError(f"mixed-precision int4: nodes not in the graph: {', '.join(sorted(set(weights) - found))}")
    save_in_place(model, folder, ".int8-mixed")


def _saved_copy(model, merged_dir: Path, work: Path) -> Path:
    """The transformed model saved as an HF directory, with the merged directory's tokenizer and other files."""
    work.mkdir(parents=True, exist_ok=True)
    for path in merged_dir.iterdir():
        if path.is_file() and not path.name.endswith((".safetensors", ".bin", ".index.json")):
            shutil.copy2(path, work / path.name)
    model.save_pretrained(work)
    return work


def int4_layer_nodes(path: Path) -> dict[str, tuple[int, tuple[str, ...]]]:
    """The decoder layers' 4-bit MatMulNBits nodes of a builder graph: name -> (layer, HF linears it holds)."""
    import onnx

    nodes = {}
    for node in onnx.load(path, load_external_data=False).graph.node:
        bits = next((a.i for a in node.attribute if a.name == "bits"), None)
        if node.op_type != "MatMulNBits" or bits != 4 or node.name == "/lm_head/MatMul_Q4":
            continue
        match = LAYER_NODE.match(node.name)
        if match is None or match.group(2) not in NODE_LINEARS:
            raise DstuneError(f"calibrated int4: no HF linear is known for the builder's node {node.name!r}")
        nodes[node.name] = int(match.group(1)), NODE_LINEARS[match.group(2)]
    return nodes


def _stacked(codes: dict, layer: int, linears: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """One node's codes and scales: its linears' stacked along the output rows, as the builder fuses them."""
    parts = [codes[f"model.layers.{layer}.{name}"] for name in linears]
    return torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])


def pack_int4(codes: torch.Tensor) -> np.ndarray:
    """MatMulNBits' 4-bit bytes of codes [rows, cols]: element 2j in the low nibble, 2j+1 in the high one."""
    values = codes.to(torch.uint8).numpy()
    return values[:, 0::2] | (values[:, 1::2] << 4)


def write_int4_codes(folder: Path, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Overwrite the named 4-bit MatMulNBits nodes' weight bytes and scales in folder/model.onnx (same shapes)."""
    import onnx_ir as ir

    from .onnx import save_in_place

    model = ir.load(folder / "model.onnx")
    found = set()
    for node in model.graph:
        if node.op_type != "MatMulNBits" or node.name not in weights:
            continue
        codes, scales = weights[node.name]
        b, s = node.inputs[1], node.inputs[2]
        packed, scale = pack_int4(codes), scales.float().numpy()
        if packed.size != int(np.prod(b.shape.dims)) or scale.size != int(np.prod(s.shape.dims)):
            raise DstuneError(f"calibrated int4: {node.name} holds {b.shape} bytes, not {packed.shape}")
        b.const_value = ir.tensor(packed.reshape(b.shape.dims), name=b.name)
        s.const_value = ir.tensor(scale.reshape(s.shape.dims), name=s.name)
        found.add(node.name)
    if found != set(weights):
        raise DstuneError(f"calibrated int4: nodes not in the graph: {', '.join(sorted(set(weights) - found))}")
    save_in_place(model, folder, ".int4-calibrated")
