"""A fused LoRA linear for training: one autograd node per adapted layer, a fast dropout mask, fewer saved tensors.

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as five autograd nodes. On a CPU three things cost:
- the dropout mask: `torch.bernoulli_` is slow on CPU; masking a layer's input took longer than the layer's own
  576x576 matmul on a demo batch (bench/dropout_mask.py measures the mask against torch's dropout);
- the dropped input is saved as a float copy for the backward of `lora_A`, one per adapted layer: seven copies of
  each layer's activations;
- the scaling and the add are two more passes over the output.

The fused function keeps peft's maths and peft's weights. The mask is drawn as 16-bit integers from the raw output
of numpy's SFC64, seeded from torch's generator so `set_seed` and saved RNG states still govern it, and saved as
one byte per element; the dropped input is recomputed in the backward; scaling and add are one `addmm_`.
The keep probability is rounded to a multiple of 2^-16 (0.95 -> 0.949997).

Layers swap class to `FastLoraLinear`, a subclass of peft's `lora.Linear`: weights, state dicts, saving and merging
are peft's own. The fused path runs only when it computes exactly what peft would: training with gradients, one
active vanilla LoRA adapter, no autocast, one dtype. Anything else (DoRA, merged, `adapter_names`, generation)
goes through peft's forward unchanged.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_MASK_LEVELS = 1 << 16


def keep_mask(shape: torch.Size, keep: float, device: torch.device) -> torch.Tensor:
    """A 0/1 uint8 mask, 1 with probability `keep` (to 2^-16 on CPU), drawn from torch's default generator.

    uint8, not bool: `x * mask` with a bool mask converts the mask to float first (1.6 ms on a 672 x 576 batch
    here), with uint8 it does not (0.12 ms).
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=torch.uint8, device=device).bernoulli_(keep)
    seed = int(torch.randint(0, 2**62, (1,)))
    count = shape.numel()
    # Raw 64-bit outputs cut into four 16-bit draws: 0.28 ms for 450k elements, bernoulli_ takes 4.1 ms.
    draws = np.random.SFC64(seed).random_raw(-(-count // 4)).view(np.uint16)[:count]
    return torch.from_numpy((draws < round(keep * _MASK_LEVELS)).view(np.uint8)).view(shape)


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T, with A and B trainable and W frozen or not."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dropout: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = F.linear(x2, weight, bias)
        # Inverted dropout's 1 / keep is applied to the rank-r product, not to the input: r columns, not `in`.
        mask = keep_mask(x2.shape, 1.0 - dropout, x.device) if dropout > 0 else None
        h = (x2 * mask if mask is not None else x2) @ lora_a.t()
        if mask is not None:
            h.mul_(1.0 / (1.0 - dropout))
        y.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, h, mask)
        ctx.scaling, ctx.dropout, ctx.has_bias = scaling, dropout, bias is not None
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, lora_a, lora_b, h, mask = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        keep_scale = 1.0 / (1.0 - ctx.dropout) if ctx.dropout > 0 else 1.0
        grad_h = (g @ lora_b).mul_(ctx.scaling)  # d loss / d h
        grad_dropped = grad_h * keep_scale  # d loss / d (x * mask), r columns
        grad_x = grad_weight = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            lora_part = grad_dropped @ lora_a
            if mask is not None:
                lora_part.mul_(mask)
            grad_x = lora_part.addmm_(g, weight).view(grad.shape[:-1] + (x2.shape[-1],))
        if ctx.needs_input_grad[1]:
            grad_weight = g.t() @ x2
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        if ctx.needs_input_grad[3]:
            grad_a = grad_dropped.t() @ (x2 * mask if mask is not None else x2)
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ h).mul_(ctx.scaling)
        return grad_x, grad_weight, grad_bias, grad_a, grad_b, None, None


def peft_lora_linear() -> type:
    """peft's LoRA Linear class (imported late: peft is slow to import)."""
    from peft.tuners.lora.layer import Linear

    return Linear


def _fused_class():
    base = peft_lora_linear()

    class FastLoraLinear(base):
        """peft's LoRA Linear whose training forward is one fused autograd node (see the module docstring)."""

        def forward(self, x, *args, **kwargs):
            adapter = self._fused_adapter(x, args, kwargs)
            if adapter is None:
                return super().forward(x, *args, **kwargs)
            dropout = self.lora_dropout[adapter]
            p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
            base_layer = self.get_base_layer()
            return LoraLinearFunction.apply(x, base_layer.weight, base_layer.bias, self.lora_A[adapter].weight,
                                            self.lora_B[adapter].weight, self.scaling[adapter], p)

        def _fused_adapter(self, x, args, kwargs) -> str | None:
            """The adapter to fuse, or None where peft's own forward must run."""
            if args or kwargs or self.disable_adapters or self.merged or not torch.is_grad_enabled():
                return None
            # (A meta-device trace, as the memory planner runs, has no autocast to ask about.)
            autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
            if autocast or len(self.active_adapters) != 1:
                return None
            adapter = self.active_adapters[0]
            if adapter not in self.lora_A or adapter in self.lora_variant or self.fan_in_fan_out:
                return None
            base_layer = self.get_base_layer()
            if type(base_layer) is not nn.Linear:
                return None
            dtypes = {x.dtype, base_layer.weight.dtype, self.lora_A[adapter].weight.dtype,
                      self.lora_B[adapter].weight.dtype}
            return adapter if len(dtypes) == 1 else None

    FastLoraLinear.__qualname__ = FastLoraLinear.__name__ = "FastLoraLinear"
    return FastLoraLinear


@functools.cache
def fused_lora_class() -> type:
    """The FastLoraLinear class (built once: it subclasses peft's, which is imported lazily)."""
    return _fused_class()


def enable_fused_lora(model: nn.Module) -> int:
    """Switch every plain peft LoRA Linear of the model to the fused training path; returns how many."""
    peft_linear, fused = peft_lora_linear(), fused_lora_class()
    count = 0
    for module in model.modules():
        if type(module) is peft_linear and type(module.get_base_layer()) is nn.Linear:
            module.__class__ = fused
            count += 1
    return count


def restore_lora_class(model: nn.Module, cls: type, attributes: tuple[str, ...] = ()) -> int:
    """Give the layers swapped to `cls` peft's LoRA Linear class back (dropping `attributes`); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is cls:
            module.__class__ = peft_lora_linear()
            for name in attributes:
                delattr(module, name)
            count += 1
    return count


def disable_fused_lora(model: nn.Module) -> int:
    """Undo enable_fused_lora (the weights never changed); returns how many layers went back."""
    return restore_lora_class(model, fused_lora_class())
