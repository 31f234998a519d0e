"""Calibrated int4 ONNX exports: the builder's int4 graph (same blocks, same mixed int8 layers, same int4 embedding
and LM head), with AWQ applied to the merged weights before it runs and GPTQ's codes written over its RTN ones.

Only the rounding of the decoder layers' int4 MatMulNBits changes: names, shapes and bytes stay the builder's, so a
calibrated export is as large and as fast as plain int4. The LM head (tied to the embedding in SmolLM2) keeps RTN:
rounding it with GPTQ would move the embedding lookups too.
"""

from __future__ import annotations

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
    if "gptq" in scheme:
        nodes = int4_layer_nodes(out_dir / "model.onnx")
        only = {f"model.layers.{layer}.{name}" for layer, linears in nodes.values() for name in linears}
        codes = gptq_model(model, calibration.samples, block, GPTQ_PERCDAMP, only=only)
        write_int4_codes(out_dir, {node: _stacked(codes, layer, linears) for node, (layer, linears) in nodes.items()})
        record.update(gptq_nodes=sorted(nodes), percdamp=GPTQ_PERCDAMP)
    return record


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
