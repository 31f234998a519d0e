"""PyTorch int8 through torchao: a merged HF directory's linear layers quantized with `quantize_`, kept as safetensors.

For users who stay in PyTorch (transformers `generate`, their own serving code) rather than ONNX Runtime or llama.cpp.
- int8: Int8DynamicActivationInt8WeightConfig, per-channel int8 weights and per-token int8 activations.
- int8wo: Int8WeightOnlyConfig, per-channel int8 weights; activations stay fp32.
- No int4: torchao 0.18 runs its packed int4 tensors on CUDA (Int4Tensor needs mslk, Int4TilePackedTo4dTensor
  tinygemm), XPU/NPU (Int4PlainInt32Tensor) or its own CPU kernel library, which the PyPI wheel does not load.
  The one int4 scheme that runs on a CPU (IntxUnpackedToInt8Tensor) keeps each int4 value in an int8 byte: no
  smaller than int8, and less accurate.
- The embeddings and the LM head stay fp32: torchao quantizes nn.Linear only, and transformers' default skip list
  keeps the output embeddings (and any weight tied to them).

Serialization: transformers 5.24 saves a torchao-quantized model as plain safetensors. Each Int8Tensor is split into
`<module>._weight_qdata` (int8), `_weight_scale` and `_weight_zero_point` tensors, and a JSON description of it goes
in the file's metadata. On load, the tensor subclasses are rebuilt from allow-lists of torchao classes, and so is
config.json's quantization_config. No pickle is involved anywhere, so dstune uses this path as it is: the artifact is
an ordinary HF directory that `from_pretrained` loads, with no manifest format of dstune's own.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..plugins import EXPORTS
from .formats import ExportFormat

QUANTS = ("int8", "int8wo")


def torchao_config(quant: str):
    """The transformers TorchAoConfig that writes `quant` (Linear layers only, LM head and embeddings skipped)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    scheme = {"int8": Int8DynamicActivationInt8WeightConfig, "int8wo": Int8WeightOnlyConfig}[quant]()
    # modules_to_not_convert=None keeps transformers' default skips: output embeddings, tied and last weights.
    return TorchAoConfig(scheme, modules_to_not_convert=None, include_input_output_embeddings=False)


def export_torchao(merged_dir: Path, out_dir: Path, quant: str) -> Path:
    """Quantize a merged HF directory's linear layers with torchao and save it (safetensors) with its tokenizer."""
    import torch
    import torchao
    import transformers
    from transformers import AutoModelForCausalLM

    from ..models.loading import check_weights, load_tokenizer

    safetensors = check_weights(Path(merged_dir))  # pickles only when allowed, and after a weights_only check
    # Loading with a quantization config runs quantize_ on each Linear as its weight arrives: the fp32 model is
    # never whole in memory. fp32 activations and scales: CPUs without bf16 run fp32 fastest.
    model = AutoModelForCausalLM.from_pretrained(
        merged_dir, dtype=torch.float32, quantization_config=torchao_config(quant),
        use_safetensors=safetensors, weights_only=True, trust_remote_code=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    load_tokenizer(Path(merged_dir)).save_pretrained(out_dir)
    # What stayed fp32 (embeddings, LM head, fused MoE experts), for a reader who does not load the model.
    kept = sorted(name for name, param in model.named_parameters()
                  if type(param.data) is torch.Tensor and param.ndim >= 2)
    (out_dir / "torchao_export.json").write_text(json.dumps({
        "format": "torchao", "quant": quant, "scheme": type(model.config.quantization_config.quant_type).__name__,
        "torchao": torchao.__version__, "transformers": transformers.__version__, "fp32_matrices": kept,
    }, indent=2))
    return out_dir


def load_torchao(artifact: Path, merged_dir: Path):
    """The quantized model (frozen, eval mode) and tokenizer of a torchao artifact; safetensors only."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..models.loading import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=False)
    # Rebuilt quantized weights come back with requires_grad=True; an export is for inference only.
    model.requires_grad_(False)
    return model.eval(), load_tokenizer(Path(artifact))


TORCHAO = EXPORTS.register("torchao", ExportFormat(
    name="torchao", quants=QUANTS,
    description="PyTorch with torchao int8 linear layers (int8: int8 activations too; int8wo: weight-only), "
                "safetensors; loads with transformers' from_pretrained",
    export=export_torchao, load=load_torchao,
))
