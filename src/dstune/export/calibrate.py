"""Calibration data for calibrated quantization (int4 GPTQ, AWQ), and the per-linear input statistics it yields.

Samples come from the recipe's train split only, encoded as training encodes them: the dev and test splits score
the export, so they must never shape it. Statistics are gathered one decoder layer at a time on cached layer inputs,
so a caller can change layer i (quantize it, rescale it) before layer i+1's inputs are computed, as GPTQ does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..data.build import load_split
from ..data.templates import get_template
from ..data.tokenize import encode_record
from ..errors import InputError

CALIBRATION_SPLIT = "train"


@dataclass(frozen=True)
class Calibration:
    """Token sequences ([1, length] each) to calibrate on, the ids of the records they came from, and their training
    labels ([1, length], IGNORE_INDEX where training takes no loss) for scans that measure the training loss."""

    samples: list[torch.Tensor]
    ids: list[str]
    split: str = CALIBRATION_SPLIT
    labels: list[torch.Tensor] = field(default_factory=list)
    # The share of the fp32 weight bytes a mixed-precision export may fill (export.int4_max_size), and how many of
    # the samples its sensitivity scan uses (export.sensitivity_samples).
    max_size: float | None = None
    scan_samples: int | None = None

    def manifest(self) -> dict:
        """What an export records about its calibration data: split, counts and a hash of the record ids."""
        digest = hashlib.sha256("\n".join(self.ids).encode()).hexdigest()
        return {"split": self.split, "samples": len(self.samples), "max_size": self.max_size,
                "scan_samples": self.scan_samples,
                "tokens": sum(int(s.numel()) for s in self.samples), "ids_sha256": digest}

    def spread(self, n: int | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Up to n of the samples (all when n is None), spread evenly over them, and their labels."""
        step = max(len(self.samples) / n, 1.0) if n else 1.0
        rows = sorted({int(i * step) for i in range(min(n or len(self.samples), len(self.samples)))})
        return [self.samples[i] for i in rows], [self.labels[i] for i in rows] if self.labels else []


def calibration_samples(recipe, tokenizer, n: int) -> Calibration:
    """Up to `n` records of the recipe's train split, spread evenly over it, encoded as training encodes them (with
    the recipe's export.int4_max_size and export.sensitivity_samples for mixed-precision exports)."""
    records = load_split(recipe.run_dir / "data", CALIBRATION_SPLIT)
    if not records:
        raise InputError(f"{recipe.run_dir / 'data'}: no train split to calibrate on; run `dstune data` first")
    step = max(len(records) / n, 1.0)
    chosen = [records[int(i * step)] for i in range(min(n, len(records)))]
    template = get_template(recipe.model.template, tokenizer)
    max_length = recipe.data.max_length
    encoded = [encode_record(tokenizer, template, r, max_length) for r in chosen]
    kept = [(e, r) for e, r in zip(encoded, chosen) if e.input_ids]
    return Calibration([torch.tensor([e.input_ids]) for e, _ in kept], [str(r["id"]) for _, r in kept],
                       labels=[torch.tensor([e.labels]) for e, _ in kept], max_size=recipe.export.int4_max_size,
                       scan_samples=recipe.export.sensitivity_samples)


@dataclass
class LinearStats:
    """Sums over calibration tokens of one linear's inputs: H = XᵀX and Σ|x| per input channel."""

    hessian: torch.Tensor
    abs_sum: torch.Tensor
    tokens: int = 0

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean |x| per input channel (AWQ's activation scale)."""
        return self.abs_sum / max(self.tokens, 1)


@dataclass
class LayerInputs:
    """Each sample's hidden states entering a decoder layer, and the keyword arguments the model passed it."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)


class _Captured(Exception):
    """Raised by the first layer's pre-hook: the rest of the forward pass is not needed."""


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a Llama-like causal LM (model.model.layers)."""
    return model.model.layers


def first_layer_inputs(model, samples: list[torch.Tensor]) -> LayerInputs:
    """What the first decoder layer receives for each sample (embeddings, rotary tables, mask)."""
    inputs = LayerInputs()

    def catch(module, args, kwargs):
        inputs.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        inputs.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Captured

    handle = decoder_layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in samples:
                try:
                    model(input_ids=ids, use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return inputs


def collect_stats(layer: nn.Module, inputs: LayerInputs) -> dict[str, LinearStats]:
    """Input statistics of every nn.Linear inside `layer` (by its name there) over the cached inputs."""
    stats: dict[str, LinearStats] = {}

    def hook(name):
        def accumulate(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            if name not in stats:
                width = x.shape[1]
                stats[name] = LinearStats(torch.zeros(width, width, dtype=torch.float64),
                                          torch.zeros(width, dtype=torch.float64))
            stats[name].hessian += x.T @ x
            stats[name].abs_sum += x.abs().sum(0)
            stats[name].tokens += x.shape[0]
        return accumulate

    handles = [m.register_forward_hook(hook(n)) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    try:
        run_layer(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """The layer's outputs for the cached inputs: the next layer's inputs."""
    out = LayerInputs(kwargs=inputs.kwargs)
    with torch.no_grad():
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
            result = layer(hidden, **kwargs)
            out.hidden.append(result[0] if isinstance(result, tuple) else result)
    return out


def sequential_stats(model, samples: list[torch.Tensor]) -> Iterator[tuple[nn.Module, dict[str, LinearStats]]]:
    """Each decoder layer in turn with its linears' input statistics; the layer's outputs are computed after the
    caller has resumed the iterator, so changes it made to the layer shape the next layer's inputs."""
    inputs = first_layer_inputs(model, samples)
    for layer in decoder_layers(model):
        yield layer, collect_stats(layer, inputs)
        inputs = run_layer(layer, inputs)
