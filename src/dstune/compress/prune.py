"""Structured pruning of a Llama-like decoder (Llama, Qwen2, SmolLM2): attention heads, MLP channels, whole layers.

Importance is activation-based, scored on calibration records of the recipe's train split:
- a query head: the mean L2 norm of its contribution to the attention output, o_proj's columns of that head applied
  to the head's output;
- an MLP channel: mean |input of down_proj| times the L2 norm of down_proj's column (Wanda's product);
- a layer: block influence (ShortGPT, Men et al. 2024), 1 − cos(layer input, layer output) averaged over tokens.
The counts are uniform across layers, because a plain config holds one head count and one intermediate size;
importance decides which heads and channels go in each layer, not how many. Heads respect GQA:
- "queries": the same number of query heads leaves every KV group, so each group keeps its KV head and the group
  size stays equal across groups;
- "groups": whole KV groups leave (their KV head and all its query heads).
`apply_plan` removes them physically (narrower linears, fewer layers, a config stating the new shapes), and
`mask_plan` zeroes the same parts in place instead: the test suite checks that both give the same logits, so the
pruned directory is exactly the masked model, loadable by plain transformers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import InputError

HEAD_MODES = ("queries", "groups")


@dataclass
class PrunePlan:
    """What stays, by original index: per kept layer its query heads (grouped by KV head, in the new order), KV
    heads and MLP channels; and the kept layers."""

    layers: list[int]
    heads: dict[int, list[int]] = field(default_factory=dict)
    kv_heads: dict[int, list[int]] = field(default_factory=dict)
    channels: dict[int, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: {str(i): v for i, v in value.items()} if isinstance(value, dict) else value
                for k, value in asdict(self).items()}


@dataclass
class Importance:
    """Scores per layer: query heads [H], MLP channels [I], and the layer's block influence."""

    heads: list[torch.Tensor]
    channels: list[torch.Tensor]
    influence: list[float]


def _shape(config) -> tuple[int, int, int]:
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    return heads, kv, getattr(config, "head_dim", None) or config.hidden_size // heads


def check_architecture(model) -> None:
    """One line when the model is not a Llama-like decoder this module knows how to prune."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    needed = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")
    names = {name for name, _ in layers[0].named_modules()} if layers else set()
    if not layers or not all(n in names for n in needed):
        raise InputError(f"prune: {type(model).__name__} is not a Llama-like decoder (q/k/v/o and gate/up/down "
                         "projections); Llama, Qwen2 and SmolLM2 are supported")


@torch.no_grad()
def score(model, samples: list[torch.Tensor]) -> Importance:
    """Activation-based importance of every head, channel and layer over the calibration samples."""
    check_architecture(model)
    heads_n, _, head_dim = _shape(model.config)
    layers = model.model.layers
    heads = [torch.zeros(heads_n, dtype=torch.float64) for _ in layers]
    channels = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    influence = [0.0 for _ in layers]
    tokens = 0
    handles = []

    def on_o_proj(index):
        def hook(module, args):
            x = args[0].reshape(-1, heads_n, head_dim).double()
            w = module.weight.double().view(module.out_features, heads_n, head_dim)
            heads[index] += torch.einsum("thd,ohd->tho", x, w).norm(dim=-1).sum(0)
        return hook

    def on_down(index):
        def hook(module, args):
            x = args[0].reshape(-1, module.in_features).double()
            channels[index] += x.abs().sum(0) * module.weight.double().norm(dim=0)
        return hook

    def on_layer(index):
        def hook(module, args, kwargs, output):
            before = (args[0] if args else kwargs["hidden_states"]).reshape(-1, model.config.hidden_size).double()
            after = (output[0] if isinstance(output, tuple) else output).reshape(before.shape).double()
            influence[index] += float((1 - nn.functional.cosine_similarity(before, after, dim=-1)).sum())
        return hook

    for index, layer in enumerate(layers):
        handles += [layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(index)),
                    layer.mlp.down_proj.register_forward_pre_hook(on_down(index)),
                    layer.register_forward_hook(on_layer(index), with_kwargs=True)]
    try:
        model.eval()
        for ids in tqdm(samples, desc="prune importance", unit=" record", disable=None):
            model(input_ids=ids, use_cache=False)
            tokens += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
    return Importance([h / tokens for h in heads], [c / tokens for c in channels], [i / tokens for i in influence])


def _count(ratio: float, total: int, what: str, keep_one: bool = True) -> int:
    """How many of `total` to remove for a ratio, rounded; at least one stays."""
    removed = round(ratio * total)
    if ratio > 0 and removed == 0:
        raise InputError(f"prune.{what}={ratio}: rounds to removing none of {total}; raise it to at least "
                         f"{0.5 / total:.3g}")
    if keep_one and removed >= total:
        raise InputError(f"prune.{what}={ratio}: would remove all {total}")
    return removed


def make_plan(config, importance: Importance, heads: float = 0.0, mlp: float = 0.0, layers: float = 0.0,
              head_mode: str = "queries") -> PrunePlan:
    """Which heads, channels and layers stay, given the removal ratios and the importance scores."""
    if head_mode not in HEAD_MODES:
        raise InputError(f"prune.head_mode={head_mode!r}: use one of {', '.join(HEAD_MODES)}")
    heads_n, kv_n, _ = _shape(config)
    group = heads_n // kv_n
    n_layers = len(importance.influence)
    drop_layers = _count(layers, n_layers, "layers")
    order = sorted(range(n_layers), key=lambda i: (importance.influence[i], i))
    kept_layers = sorted(set(range(n_layers)) - set(order[:drop_layers]))
    plan = PrunePlan(kept_layers)
    for index in kept_layers:
        scores = importance.heads[index]
        if head_mode == "queries":
            drop = _count(heads, group, "heads (query heads per KV group)") if heads else 0
            kept_kv = list(range(kv_n))
            kept = []
            for g in kept_kv:
                members = list(range(g * group, (g + 1) * group))
                ranked = sorted(members, key=lambda h: (float(scores[h]), h))
                kept += sorted(ranked[drop:])
        else:
            drop = _count(heads, kv_n, "heads (KV groups)") if heads else 0
            totals = [float(scores[g * group:(g + 1) * group].sum()) for g in range(kv_n)]
            kept_kv = sorted(sorted(range(kv_n), key=lambda g: (totals[g], g))[drop:])
            kept = [h for g in kept_kv for h in range(g * group, (g + 1) * group)]
        channels = importance.channels[index]
        drop_channels = _count(mlp, len(channels), "mlp") if mlp else 0
        ranked = sorted(range(len(channels)), key=lambda c: (float(channels[c]), c))
        plan.heads[index], plan.kv_heads[index] = kept, kept_kv
        plan.channels[index] = sorted(ranked[drop_channels:])
    return plan


def _rows(linear: nn.Linear, rows: list[int]) -> nn.Linear:
    out = nn.Linear(linear.in_features, len(rows), bias=linear.bias is not None, dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(linear.weight[rows])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[rows])
    return out


def _columns(linear: nn.Linear, columns: list[int]) -> nn.Linear:
    out = nn.Linear(len(columns), linear.out_features, bias=linear.bias is not None, dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(linear.weight[:, columns])
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
    return out


def _units(indices: list[int], size: int) -> list[int]:
    """The rows (or columns) of whole units of `size` (a head's head_dim)."""
    return [i * size + j for i in indices for j in range(size)]


@torch.no_grad()
def apply_plan(model, plan: PrunePlan) -> None:
    """Remove what the plan leaves out, in place, and state the new shapes in the model's config."""
    config = model.config
    heads_n, kv_n, head_dim = _shape(config)
    kept = nn.ModuleList()
    for new_index, index in enumerate(plan.layers):
        layer = model.model.layers[index]
        attention, mlp = layer.self_attn, layer.mlp
        attention.q_proj = _rows(attention.q_proj, _units(plan.heads[index], head_dim))
        attention.k_proj = _rows(attention.k_proj, _units(plan.kv_heads[index], head_dim))
        attention.v_proj = _rows(attention.v_proj, _units(plan.kv_heads[index], head_dim))
        attention.o_proj = _columns(attention.o_proj, _units(plan.heads[index], head_dim))
        attention.num_key_value_groups = len(plan.heads[index]) // len(plan.kv_heads[index])
        attention.layer_idx = new_index
        mlp.gate_proj = _rows(mlp.gate_proj, plan.channels[index])
        mlp.up_proj = _rows(mlp.up_proj, plan.channels[index])
        mlp.down_proj = _columns(mlp.down_proj, plan.channels[index])
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(plan.channels[index])
        kept.append(layer)
    model.model.layers = kept
    first = plan.layers[0]
    config.head_dim = head_dim  # no longer hidden_size // num_attention_heads
    config.num_attention_heads = len(plan.heads[first])
    config.num_key_value_heads = len(plan.kv_heads[first])
    config.intermediate_size = len(plan.channels[first])
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in plan.layers]
    config.num_hidden_layers = len(plan.layers)


def mask_plan(model, plan: PrunePlan) -> list:
    """Zero what the plan leaves out instead of removing it (o_proj columns of dropped heads, down_proj columns of
    dropped channels; dropped layers pass their input through): the reference the pruned model must equal.
    Returns the hooks' handles."""
    heads_n, _, head_dim = _shape(model.config)
    handles = []
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            if index not in plan.layers:
                def identity(module, args, kwargs, output):
                    hidden = args[0] if args else kwargs["hidden_states"]
                    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
                handles.append(layer.register_forward_hook(identity, with_kwargs=True))
                continue
            dropped = sorted(set(range(heads_n)) - set(plan.heads[index]))
            layer.self_attn.o_proj.weight[:, _units(dropped, head_dim)] = 0
            channels = sorted(set(range(layer.mlp.down_proj.in_features)) - set(plan.channels[index]))
            layer.mlp.down_proj.weight[:, channels] = 0
    return handles


def parameters(model) -> int:
    """Parameters, a tied embedding counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
