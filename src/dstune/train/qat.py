"""Quantization-aware LoRA training: the forward pass fake-quantizes the merged weight, as the export will.

What gets deployed is quantize(W + s·B·A): the export merges the adapter, then quantizes. So each adapted layer
computes y = x · fq(W + s·B·A)ᵀ + bias, where fq quantizes and dequantizes exactly as the deployment quantizer
does, and the gradient passes fq unchanged (straight-through) to A and B. Fake-quantizing W alone and adding an
unquantized LoRA branch would train a model that is never deployed. Dropout on the LoRA input has no merged-weight
form, so QAT needs lora.dropout 0.

The fake quantizers reproduce the deployment quantizers bit for bit in float32 (tests/train/test_qat.py):
- int4: onnxruntime's MLAS block quantizer, which onnxruntime-genai's model builder runs for int4 (MatMulNBits,
  symmetric; dstune's export asks for blocks of INT4_BLOCK_SIZE = 16, QAT's default). Blocks of `group_size` along
  the input dimension; m is the block's value of largest magnitude (the negative one on a tie), scale = -m/8,
  q = clamp(roundf(w · (1/scale) + 8), 0, 15) with roundf's halves away from zero, and the weight used is
  (q - 8) · scale: m lands on -8 exactly, the other end reaches +7.
- int8: torchao's Int8Tensor (Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig), through torchao's own
  primitives: per output row, scale = max|w| / 127.5 (at least float32 eps), q = clamp(round-half-even(w · (1/scale)),
  -128, 127), weight q · scale.
Only the weights are emulated. The int8 export's per-token int8 activations and the ONNX CPU kernel's int8
activations (accuracy_level 4) are not.

Layers swap class to `QatLoraLinear`, a subclass of peft's `lora.Linear`: weights, state dicts, saving and merging
are peft's own. Merged, disabled or mixed-adapter calls go through peft's forward unchanged.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..export.onnx import INT4_BLOCK_SIZE
from .fastlora import peft_lora_linear, restore_lora_class

SCHEMES = ("int4", "int8")


def int4_scales(blocks: torch.Tensor) -> torch.Tensor:
    """MLAS's symmetric int4 scale of each [..., block] row: its value of largest magnitude over -8."""
    high, low = blocks.amax(-1, keepdim=True), blocks.amin(-1, keepdim=True)
    return torch.where(high.abs() > low.abs(), high, low) / -8.0


def int4_codes(blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """MLAS's int4 codes (0..15, zero at 8, as float32) of float32 values on a given scale."""
    reciprocal = torch.where(scale != 0, 1.0 / scale, 0.0)
    shifted = blocks * reciprocal + 8.0  # two float32 roundings, as MLAS (no fused multiply-add)
    floor = shifted.floor()
    # C's roundf: halves away from zero (torch.round goes to even); shifted >= 0 wherever the clamp keeps it.
    return (floor + (shifted - floor >= 0.5)).clamp_(0.0, 15.0)


def fake_quantize_int4(weight: torch.Tensor, group_size: int = INT4_BLOCK_SIZE) -> torch.Tensor:
    """The weight MatMulNBits computes with after onnxruntime's symmetric int4 block quantization."""
    rows, cols = weight.shape
    # onnxruntime pads the input dimension with zeros to whole blocks; a zero never changes a block's scale.
    blocks = F.pad(weight.float(), (0, -cols % group_size)).view(rows, -1, group_size)
    scale = int4_scales(blocks)
    return ((int4_codes(blocks, scale) - 8.0) * scale).view(rows, -1)[:, :cols].to(weight.dtype)


def fake_quantize_int8(weight: torch.Tensor) -> torch.Tensor:
    """The weight torchao's Int8Tensor dequantizes to: symmetric per-row int8 through torchao's own primitives."""
    from torchao.quantization.quant_primitives import (MappingType, choose_qparams_affine, dequantize_affine,
                                                       quantize_affine)

    block = [1, weight.shape[1]]
    w = weight.float()
    scale, zero = choose_qparams_affine(w, MappingType.SYMMETRIC, block, torch.int8, quant_min=-128, quant_max=127,
                                        eps=torch.finfo(torch.float32).eps, scale_dtype=torch.float32,
                                        zero_point_dtype=torch.int8, keepdim=True)
    q = quantize_affine(w, block, scale, zero, torch.int8, quant_min=-128, quant_max=127)
    return dequantize_affine(q, block, scale, zero, torch.int8, output_dtype=torch.float32).to(weight.dtype)


def fake_quantize(weight: torch.Tensor, scheme: str, group_size: int = INT4_BLOCK_SIZE) -> torch.Tensor:
    """fake_quantize_int4 or fake_quantize_int8 by scheme name."""
    return fake_quantize_int4(weight, group_size) if scheme == "int4" else fake_quantize_int8(weight)


class StraightThrough(torch.autograd.Function):
    """fake_quantize forward; the gradient passes unchanged (w + (fq(w) - w).detach() would be off by rounding)."""

    @staticmethod
    def forward(ctx, weight, scheme: str, group_size: int):
        return fake_quantize(weight, scheme, group_size)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _qat_class():
    base = peft_lora_linear()

    class QatLoraLinear(base):
        """peft's LoRA Linear whose forward uses the fake-quantized merged weight (see the module docstring)."""

        def forward(self, x, *args, **kwargs):
            adapter = self._qat_adapter(args, kwargs)
            if adapter is None:
                return super().forward(x, *args, **kwargs)
            return F.linear(x, self.quantized_weight(adapter), self.get_base_layer().bias)

        def merged_weight(self, adapter: str) -> torch.Tensor:
            """W + s·B·A computed as peft's merge computes it."""
            weight = self.get_base_layer().weight
            return weight + self.get_delta_weight(adapter).to(weight.dtype)

        def quantized_weight(self, adapter: str) -> torch.Tensor:
            """fq(W + s·B·A); without gradients it is kept until a weight changes (generation reuses it per token)."""
            if torch.is_grad_enabled():
                self.qat_cache = None
                return StraightThrough.apply(self.merged_weight(adapter), self.qat_scheme, self.qat_group_size)
            tensors = (self.get_base_layer().weight, self.lora_A[adapter].weight, self.lora_B[adapter].weight)
            # In-place updates (optimizer steps, load_state_dict) bump a tensor's _version.
            key = (adapter, self.scaling[adapter], *((t.data_ptr(), t._version) for t in tensors))
            if self.qat_cache is None or self.qat_cache[0] != key:
                self.qat_cache = (key, fake_quantize(self.merged_weight(adapter), self.qat_scheme,
                                                     self.qat_group_size))
            return self.qat_cache[1]

        def _qat_adapter(self, args, kwargs) -> str | None:
            """The adapter to fake-quantize with, or None where peft's own forward must run."""
            if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
                return None
            adapter = self.active_adapters[0]
            return adapter if adapter in self.lora_A and adapter not in self.lora_variant else None

    QatLoraLinear.__qualname__ = QatLoraLinear.__name__ = "QatLoraLinear"
    return QatLoraLinear


@functools.cache
def qat_lora_class() -> type:
    """The QatLoraLinear class (built once: it subclasses peft's, which is imported lazily)."""
    return _qat_class()


def enable_qat(model: nn.Module, scheme: str, group_size: int = INT4_BLOCK_SIZE) -> int:
    """Switch every plain peft LoRA Linear of the model to fake-quantized training; returns how many."""
    if scheme not in SCHEMES:
        raise ValueError(f"QAT scheme {scheme!r} is not one of {SCHEMES}")
    peft_linear, qat = peft_lora_linear(), qat_lora_class()
    count = 0
    for name, module in model.named_modules():
        if type(module) is not peft_linear or type(module.get_base_layer()) is not nn.Linear:
            continue
        if module.fan_in_fan_out or module.lora_variant or any(module.lora_bias.values()):
            raise ValueError(f"{name}: QAT covers plain LoRA only (no DoRA, lora_bias or fan_in_fan_out)")
        if any(isinstance(d, nn.Dropout) and d.p > 0 for d in module.lora_dropout.values()):
            raise ValueError(f"{name}: QAT needs LoRA dropout 0 (a merged weight cannot drop the LoRA input)")
        module.__class__ = qat
        module.qat_scheme, module.qat_group_size, module.qat_cache = scheme, group_size, None
        count += 1
    if not count:
        raise InputError("train.qat: no LoRA nn.Linear layer to fake-quantize (QAT needs a full-precision base, "
                         "not model.load_in_4bit)")
    return count


def disable_qat(model: nn.Module) -> int:
    """Undo enable_qat (the weights never changed); returns how many layers went back."""
    return restore_lora_class(model, qat_lora_class(), ("qat_scheme", "qat_group_size", "qat_cache"))
