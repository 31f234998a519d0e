"""Calibrated int4 on the ONNX export's own grid: MLAS's symmetric blocks (scale = m/-8, codes 0..15, zero at 8).

Round-to-nearest (RTN, dstune.train.qat.fake_quantize_int4) is what the builder writes. Two calibrated methods change
only the rounding or the weights it sees, never the layout, so their exports have the same bytes and speed:
- GPTQ (Frantar et al. 2022): columns are rounded one at a time, and each one's error, weighted by the inverse
  Hessian H = XᵀX of the layer's calibration inputs, is pushed onto the columns not yet rounded. Static groups: a
  block's scale is fixed from the error-updated weights when the block starts. The codes are written into the
  builder's MatMulNBits initializers (dstune.export.onnx.write_int4_codes), since RTN would not reproduce them.
- AWQ-style scaling (Lin et al. 2023): input channel j of a linear is multiplied by s_j = mean|x_j|^alpha and the
  op before it (an RMSNorm, or up_proj's rows for down_proj) divided by s_j. The fp32 model is unchanged; RTN then
  rounds the salient channels more finely. alpha is chosen per group from a grid by the quantized output error
  tr(D H Dᵀ); alpha = 0 is RTN, so the choice is never worse than RTN on the calibration data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..train.qat import fake_quantize_int4, int4_codes, int4_scales
from .calibrate import sequential_stats

# AWQ's scaled groups in a Llama/Qwen2 decoder layer: the op whose output channels absorb 1/s, and the linears
# reading that output, whose input columns take s. v_proj -> o_proj is skipped, as AutoAWQ does for GQA.
AWQ_GROUPS = {
    "attention": ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "mlp": ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    "down": ("mlp.up_proj", ("mlp.down_proj",)),
}
AWQ_ALPHAS = tuple(i / 10 for i in range(11))
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def rtn_codes(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest codes [rows, blocks·block] (uint8, padding at 8) and scales [rows, blocks] of a weight."""
    rows, cols = weight.shape
    blocks = F.pad(weight.float(), (0, -cols % block)).view(rows, -1, block)
    scale = int4_scales(blocks)
    return int4_codes(blocks, scale).to(torch.uint8).view(rows, -1), scale[..., 0]


def dequantize(codes: torch.Tensor, scales: torch.Tensor, cols: int) -> torch.Tensor:
    """The float32 weight [rows, cols] that MatMulNBits computes with from codes and scales."""
    rows, block = codes.shape[0], codes.shape[1] // scales.shape[1]
    values = (codes.float().view(rows, -1, block) - 8.0) * scales[..., None]
    return values.view(rows, -1)[:, :cols]


def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, block: int,
               percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's codes and scales (rtn_codes' layout) of a [rows, cols] weight, given its inputs' H = XᵀX."""
    rows, cols = weight.shape
    w = weight.detach().float().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0  # channels never active: any weight there is free, so zero it
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    # The upper Cholesky factor of H⁻¹: row j holds how column j's error spreads over the later columns.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    codes = torch.full((rows, -(-cols // block) * block), 8, dtype=torch.uint8)
    scales = torch.zeros(rows, -(-cols // block))
    scale = None
    for j in range(cols):
        if j % block == 0:
            scale = int4_scales(w[:, j:j + block])
            scales[:, j // block] = scale[:, 0]
        q = int4_codes(w[:, j:j + 1], scale)
        codes[:, j] = q[:, 0].to(torch.uint8)
        error = (w[:, j] - (q[:, 0] - 8.0) * scale[:, 0]) / hinv[j, j]
        w[:, j + 1:] -= error[:, None] * hinv[j, j + 1:][None, :]
    return codes, scales


def gptq_model(model, samples: list[torch.Tensor], block: int, percdamp: float = 0.01,
               only: set[str] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ every decoder linear (`only`: just these qualified names), layer by layer; returns name -> (codes,
    scales) and leaves the model with the dequantized weights, which shaped the later layers' inputs."""
    result = {}
    for index, (layer, stats) in enumerate(sequential_stats(model, samples)):
        for name in LINEARS:
            qualified = f"model.layers.{index}.{name}"
            if only is not None and qualified not in only:
                continue
            linear = layer.get_submodule(name)
            codes, scales = gptq_codes(linear.weight, stats[name].hessian, block, percdamp)
            with torch.no_grad():
                linear.weight.copy_(dequantize(codes, scales, linear.in_features))
            result[qualified] = codes, scales
    return result


def rtn_model(model, block: int) -> None:
    """Round every decoder linear's weight to nearest, in place (the reference the calibrated methods beat)."""
    with torch.no_grad():
        for layer in model.model.layers:
            for name in LINEARS:
                linear = layer.get_submodule(name)
                linear.weight.copy_(fake_quantize_int4(linear.weight, block))


def _quantized_error(weights: list[torch.Tensor], hessian: torch.Tensor, scale: torch.Tensor, block: int) -> float:
    """Σ over the weights of tr(D H Dᵀ), D = fq(W·s)/s - W: the output error of RTN after scaling by s."""
    total = 0.0
    for w in weights:
        d = (fake_quantize_int4(w * scale, block) / scale - w).double()
        total += float(((d @ hessian) * d).sum())
    return total


def awq_scale(weights: list[torch.Tensor], stats, block: int, alphas=AWQ_ALPHAS) -> tuple[torch.Tensor, float]:
    """The per-input-channel scale mean|x|^alpha (normalized) of least quantized output error, and its alpha."""
    activation = stats.abs_mean.float().clamp(min=1e-5)
    best = None
    for alpha in alphas:
        scale = activation ** alpha
        scale = scale / (scale.max() * scale.min()).sqrt()  # centred on 1, so weights keep their range
        error = _quantized_error(weights, stats.hessian, scale, block)
        if best is None or error < best[0]:
            best = error, scale, alpha
    return best[1], best[2]


def awq_transform(model, samples: list[torch.Tensor], block: int, down: bool = True,
                  alphas=AWQ_ALPHAS) -> list[dict]:
    """Fold AWQ scales into the model's weights in place (its fp32 outputs stay the same); returns the alphas."""
    chosen = []
    for index, (layer, stats) in enumerate(sequential_stats(model, samples)):
        for group, (before, linears) in AWQ_GROUPS.items():
            if group == "down" and not down:
                continue
            modules = [layer.get_submodule(name) for name in linears]
            scale, alpha = awq_scale([m.weight.detach().float() for m in modules], stats[linears[0]], block, alphas)
            previous = layer.get_submodule(before)
            with torch.no_grad():
                for module in modules:
                    module.weight.mul_(scale.to(module.weight.dtype)[None, :])
                if previous.weight.dim() == 1:  # an RMSNorm's gain
                    previous.weight.div_(scale.to(previous.weight.dtype))
                else:  # a linear's output rows (up_proj before down_proj)
                    previous.weight.div_(scale.to(previous.weight.dtype)[:, None])
                    if getattr(previous, "bias", None) is not None:
                        previous.bias.div_(scale.to(previous.bias.dtype))
            chosen.append({"layer": index, "group": group, "alpha": alpha})
    return chosen
