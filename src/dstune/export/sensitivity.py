"""Mixed-precision int4 by measured sensitivity: which decoder matmuls to keep in int8.

The scan quantizes one matmul at a time to int4 (round-to-nearest, the export's blocks), everything else fp32, and
measures the loss increase on the supervised tokens of calibration samples from the train split: the rise of the
cross-entropy against the fp32 model's own next-token distribution, i.e. KL(fp32 || quantized). That is what the
accuracy gate compares (the export against fp32), it is never negative, and unlike the cross-entropy on the labels
it does not reward a rounding that happens to move a wrong answer toward a right one. A fused node (the builder's
qkv_proj) is quantized as a whole. The placement then keeps the matmuls of largest increase in int8 while the
export stays within a byte budget.

Cost: each node's run starts from the cached fp32 inputs of its own layer, so the scan is about half of one
forward pass per node (151 nodes for SmolLM2-135M: ~3 min on 2 cores with 128 samples of ~41 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.tokenize import IGNORE_INDEX
from ..train.logit_cache import pad_batch, topk_kl
from ..train.qat import fake_quantize_int4
from .calibrate import LayerInputs, decoder_layers, first_layer_inputs, run_layer

# Sequences per forward pass of the scan, right-padded (causal attention: real tokens never see the padding).
SCAN_BATCH = 16
# The fp32 model's tokens per position that the divergence tells apart (the rest are one bucket).
TOP_K = 256


@dataclass(frozen=True)
class Placement:
    """The int8 nodes a budget affords, in order of sensitivity, and what that costs."""

    int8: list[str]
    extra_bytes: int
    budget_bytes: int


def padded_batches(samples: list[torch.Tensor], labels: list[torch.Tensor] | None,
                   size: int = SCAN_BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) batches, right-padded; labels default to next-token targets on every token."""
    batches = []
    for start in range(0, len(samples), size):
        ids = [s[0] for s in samples[start:start + size]]
        tags = [t[0] for t in labels[start:start + size]] if labels else ids
        batches.append((pad_batch(ids, 0)["input_ids"], pad_batch(tags, IGNORE_INDEX)["input_ids"]))
    return batches


def _head(model, start: int, inputs: LayerInputs, targets: list[torch.Tensor]) -> list[torch.Tensor]:
    """Log-probabilities at each batch's supervised positions, running the decoder from layer `start`'s inputs."""
    for layer in decoder_layers(model)[start:]:
        inputs = run_layer(layer, inputs)
    out = []
    with torch.no_grad():
        for hidden, target in zip(inputs.hidden, targets):
            keep = target[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
            out.append(F.log_softmax(model.lm_head(model.model.norm(hidden[:, :-1][keep])).float(), dim=-1))
    return out


def scan(model, samples: list[torch.Tensor], labels: list[torch.Tensor] | None, block: int,
         nodes: dict[str, tuple[int, tuple[str, ...]]], k: int = TOP_K) -> dict[str, float]:
    """Each node's divergence from the fp32 model with only its linears in int4 (the model is left unchanged).

    The divergence is KL(fp32 || quantized) per supervised token: how much the cross-entropy against the fp32
    model's own predictions rises. It is taken over the fp32 model's top k tokens and one bucket for the rest
    (dstune.train.logit_cache.topk_kl), so the reference stays small whatever the vocabulary.
    `nodes`: name -> (layer index, the HF linears it holds, e.g. q/k/v for a fused qkv).
    """
    batches = padded_batches(samples, labels)
    targets = [t for _, t in batches]
    cached = [first_layer_inputs(model, [ids for ids, _ in batches])]
    for layer in decoder_layers(model)[:-1]:
        cached.append(run_layer(layer, cached[-1]))
    reference = [logprobs.topk(min(k, logprobs.shape[-1]), dim=-1) for logprobs in _head(model, 0, cached[0], targets)]
    tokens = sum(values.shape[0] for values, _ in reference)
    deltas = {}
    for name, (index, linears) in tqdm(sorted(nodes.items(), key=lambda item: item[1][0]), desc="int4 sensitivity",
                                       unit=" matmul", disable=None):
        modules = [decoder_layers(model)[index].get_submodule(linear) for linear in linears]
        saved = [m.weight.detach().clone() for m in modules]
        with torch.no_grad():
            for m in modules:
                m.weight.copy_(fake_quantize_int4(m.weight, block))
        try:
            quantized = _head(model, index, cached[index], targets)
        finally:
            with torch.no_grad():
                for m, weight in zip(modules, saved):
                    m.weight.copy_(weight)
        total = sum(float(topk_kl(q[None], values[None], ids[None], torch.ones(1, len(q))))
                    for q, (values, ids) in zip(quantized, reference))
        deltas[name] = total / max(tokens, 1)
    return deltas


def place(deltas: dict[str, float], costs: dict[str, int], budget: int) -> Placement:
    """The most sensitive nodes (largest loss increase first) whose int8 copies fit in `budget` extra bytes.

    A node that does not fit is passed over for smaller ones after it; nodes whose int4 rounding did not raise the
    loss stay int4.
    """
    chosen, spent = [], 0
    for name in sorted(deltas, key=lambda n: (-deltas[n], n)):
        if deltas[name] <= 0:
            break
        if spent + costs[name] <= budget:
            chosen.append(name)
            spent += costs[name]
    return Placement(chosen, spent, budget)
