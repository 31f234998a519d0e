"""Causal-LM loss with the LM head run only on supervised positions, chunked so full logits never exist.

The model runs with `logits_to_keep` empty and returns its final hidden states; the positions whose next token is
supervised are gathered (any layout: left-padded or packed rows), and `linear_cross_entropy` projects them onto the
vocabulary a chunk at a time. It computes the gradients chunk by chunk in the forward pass and keeps only them, so
the peak is one chunk of logits (64 MB) instead of tokens x vocabulary floats, plus their gradient.

Architectures whose logits are not plainly `lm_head(final hidden state)` (soft-capping, logit scales) take the
fallback: `logits_to_keep` with the supervised columns and a plain cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tokenize import IGNORE_INDEX

# Model types whose logits are lm_head(final normed hidden state), with no bias, scale or cap.
PLAIN_HEAD_MODELS = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "deepseek_v2", "deepseek_v3", "phi3",
})
CHUNK_BYTES = 64 << 20


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight^T, target_i), computed and differentiated a chunk of rows at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if want_hidden or want_weight:
                # d/dlogits of the summed CE: softmax - one_hot, built in place in the logits buffer.
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                accumulate_head_gradients(probs.to(h.dtype), h, weight, grad_hidden, grad_weight, start)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return (*scaled_head_gradients(ctx, grad_total), None, None)


def accumulate_head_gradients(dlogits, h, weight, grad_hidden, grad_weight, start: int) -> None:
    """A chunk's share of a chunked LM-head loss's gradients, from d loss / d logits of its rows `h` (from `start`):
    its rows of grad_hidden, and its sum into grad_weight (either may be None: not wanted)."""
    if grad_hidden is not None:
        torch.mm(dlogits, weight, out=grad_hidden[start:start + len(h)])
    if grad_weight is not None:
        grad_weight.addmm_(dlogits.t().to(grad_weight.dtype), h.to(grad_weight.dtype))


def scaled_head_gradients(ctx, grad_total):
    """The backward of a chunked LM-head loss whose forward saved its gradients: them times the incoming one."""
    grad_hidden, grad_weight = ctx.saved_tensors
    grad_h = grad_hidden * grad_total.to(grad_hidden.dtype) if grad_hidden is not None else None
    grad_w = (grad_weight * grad_total).to(ctx.weight_dtype) if grad_weight is not None else None
    return grad_h, grad_w


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `targets` without materialising all the logits."""
    chunk = chunk or max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    return LinearCrossEntropy.apply(hidden, weight, targets, chunk)


def output_head(model) -> nn.Linear | None:
    """The LM head when logits are exactly `head(final hidden state)` for this architecture, else None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    return head


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Columns p whose next token (p + 1) is supervised in at least one row."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)


def supervised_lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy over the supervised tokens, and how many there are."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_tokens")}
    head = output_head(model)
    if head is None:
        positions = supervised_positions(labels)
        logits = model(**inputs, logits_to_keep=positions).logits
        targets = labels[:, positions + 1]
        loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        return loss_sum, (targets != IGNORE_INDEX).sum()
    rows, targets = supervised_hidden(model, batch)
    return linear_cross_entropy(rows, head.weight, targets), torch.tensor(len(targets), device=targets.device)


def supervised_hidden(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The final hidden states [rows, d] at the positions whose next token is supervised, and those tokens, from a
    forward pass that runs no LM head (plain-head models: see output_head)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_tokens")}
    keep_none = torch.empty(0, dtype=torch.long, device=labels.device)
    hidden = model(**inputs, logits_to_keep=keep_none, output_hidden_states=True).hidden_states[-1]
    supervised = labels[:, 1:] != IGNORE_INDEX
    return hidden[:, :-1][supervised], labels[:, 1:][supervised]
