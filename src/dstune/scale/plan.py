"""`dstune plan`: the peak memory per device and the step time of a recipe's training run, from the config alone.

Nothing is loaded but the model's config. The model is built on the meta device (no weights, no memory), the
recipe's method is added to it as in training, and one forward pass at the recipe's batch and sequence length is
traced with `torch.autograd.graph.saved_tensors_hooks`: every tensor autograd keeps for the backward pass is
counted once (by storage), and attributed to the decoder layer that saved it. That is the activation memory of
this exact code (dropout masks, the fused LoRA path, upcasts, MLA, MoE routing), not a formula per architecture.

Attention runs through a stand-in during the trace that keeps what the fused kernels keep (q, k, v, the output and
the log-sum-exp per row; FlashAttention on GPUs, the flash kernel of PyTorch's CPU SDPA), not the math fallback's
L x L probabilities, which the meta device would otherwise count. Gradient checkpointing then keeps each layer's
input plus one layer's activations while it is recomputed.

The rest is arithmetic over the meta model's parameters, with their real dtypes:
- weights: the recipe's dtype, or NF4 with double quantization (0.516 bytes/parameter) for the linear layers of a
  4-bit base (bitsandbytes leaves the LM head and fused 3-D expert weights alone);
- adapter, gradients and AdamW's two states: the trainable parameters in their own dtype (peft keeps adapters in
  fp32 over a bf16 base);
- sharding: DDP keeps everything on every device; ZeRO-2 shards gradients and optimizer states; FSDP2 and ZeRO-3
  also shard the weights and gather one decoder layer at a time (two with prefetch); expert parallelism splits
  the routed experts, which then are not gathered;
- the loss head: dstune's chunked supervised-only head (dstune.train.loss) keeps one chunk of fp32 logits;
- the backward pass's working memory: gradients of one layer's activations, as many bytes as that layer saved;
- on CPUs, glibc's heap: freed blocks are not returned to the system while later allocations sit above them, so
  the resident set grows past the live bytes. `CPU_HEAP_OVERHEAD` is that ratio, measured once on a small step
  (bench/plan_memory.py, which checks the whole prediction on three other settings).

The time is FLOPs over an assumed utilisation of the device's bf16 peak (`--mfu`, 0.4 by default): an estimate to
size a run, not a measurement.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from . import GPUS

CONFIG_DIR = Path(__file__).with_name("model_configs")
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits, an 8-bit absmax per 64, an fp32 scale per 256 absmaxes
# The resident set of a CPU training step over its live bytes (glibc malloc; bench/plan_memory.py measures it on a
# 2 x 128-token step, then checks the prediction on settings 16 to 32 times larger).
CPU_HEAP_OVERHEAD = 1.59
# Device memory the framework holds besides tensors (CUDA context, cuBLAS workspaces, the caching allocator's
# slack), as commonly measured on A100/H100 with PyTorch 2.x.
CUDA_OVERHEAD = 1.5e9
STRATEGIES = ("ddp", "zero2", "fsdp2", "zero3")


def parse_bytes(text: str, key: str = "--gpu-memory") -> float:
    """'80GB', '80G', '24GiB' or a plain number of GB, in bytes (GB and GiB are both read as 2**30 bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(g|gb|gib|m|mb|mib|t|tb|tib)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise InputError(f"{key}: {text!r} is not a size (write e.g. 80GB)")
    unit = (match.group(2) or "g").lower()[0]
    return float(match.group(1)) * {"m": 2**20, "g": 2**30, "t": 2**40}[unit]


# --- the model's config, without weights ---

def shipped_configs() -> dict[str, Path]:
    """The model configs dstune ships (name -> file): the DeepSeek models its recipes target."""
    return {path.stem: path for path in sorted(CONFIG_DIR.glob("*.json"))}


def _config_from_dict(values: dict, label: str):
    from transformers import AutoConfig

    values = dict(values)
    values.pop("quantization_config", None)  # planned at the recipe's dtype (see docs/scale.md for FP8 weights)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise InputError(f"{label}: no model_type, so not a Hugging Face model config")
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError as exc:
        raise InputError(f"{label}: {str(exc).splitlines()[0]}") from None


def load_model_config(name_or_path: str, config: str | None = None, trust_remote_code: bool = False):
    """The transformers config of `config` (a config.json, a model folder or a shipped name), else of the recipe's
    model: a local folder or GGUF, an embedded model, or a shipped config whose name matches the folder's."""
    from transformers import AutoConfig

    shipped = shipped_configs()
    for candidate, label in ((config, "--config"), (name_or_path, "model.name_or_path")):
        if not candidate:
            continue
        path = Path(candidate).expanduser()
        if path.is_file() and path.suffix == ".json":
            return _config_from_dict(json.loads(path.read_text()), str(path))
        if (path / "config.json").is_file():
            return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        key = path.name.lower()
        if key in shipped:
            return _config_from_dict(json.loads(shipped[key].read_text()), str(shipped[key]))
        if label == "--config":
            raise InputError(f"--config: {candidate} is neither a config.json, a model folder nor one of: "
                             + ", ".join(shipped))
    from ..models.loading import EMBEDDED_MODELS, resolve_model_path

    if name_or_path in EMBEDDED_MODELS or name_or_path.endswith(".gguf"):
        return AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    raise InputError(f"model.name_or_path: {name_or_path} is not a local model folder and no shipped config is "
                     f"named {Path(name_or_path).name.lower()!r}; pass --config (a config.json) or one of: "
                     + ", ".join(shipped))


# --- the activation trace ---

class _FusedAttention(torch.autograd.Function):
    """SDPA as the fused kernels keep it for backward: q, k, v, the output and one log-sum-exp per row."""

    @staticmethod
    def forward(ctx, query, key, value, mask):
        # Laid out (batch, length, heads, dim) as the kernels write it, so the caller's transpose back is free.
        batch, heads, length = query.shape[:-1]
        out = query.new_empty(batch, length, heads, value.shape[-1]).transpose(1, 2)
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse, *([mask] if mask is not None else []))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("the planner's attention stand-in has no backward")


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FusedAttention.apply(query, key, value, attn_mask)


class _GroupedMatmul(torch.autograd.Function):
    """The experts' grouped matmul (the meta device's own accepts bf16 only)."""

    @staticmethod
    def forward(ctx, a, b, offs):
        # As autograd's formula: each operand is kept only for the other's gradient (frozen experts keep no input).
        kept = [b] if a.requires_grad else []
        kept += [a] if b.requires_grad else []
        ctx.save_for_backward(*kept, *([offs] if offs is not None else []))
        return a.new_empty(a.shape[0], b.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("the planner's grouped matmul stand-in has no backward")


def _grouped_mm(a, b, offs=None, bias=None, out_dtype=None):
    return _GroupedMatmul.apply(a, b, offs)


@contextlib.contextmanager
def _traced_kernels():
    """SDPA and the grouped expert matmul replaced by stand-ins that keep what the real kernels keep."""
    functional = torch.nn.functional
    saved = {name: getattr(functional, name, None) for name in ("scaled_dot_product_attention", "grouped_mm")}
    functional.scaled_dot_product_attention = _fused_sdpa
    functional.grouped_mm = _grouped_mm
    try:
        yield
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(functional, name)
            else:
                setattr(functional, name, original)


@dataclass
class Trace:
    """What autograd keeps after one forward pass: per decoder layer, outside the layers, and each layer's input."""

    per_layer: list[int]
    outside: int
    layer_input: int

    def activations(self, checkpointing: bool) -> int:
        """Bytes kept for backward: all of it, or (checkpointing) each layer's input plus one recomputed layer."""
        if not checkpointing:
            return sum(self.per_layer) + self.outside
        return self.layer_input * len(self.per_layer) + max(self.per_layer, default=0) + self.outside


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (the largest ModuleList of the base model)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def trace_activations(model: nn.Module, batch: int, seq: int, packing: bool) -> Trace:
    """Trace one training forward pass of the meta `model` at batch x seq."""
    layers = decoder_layers(model)
    current: list[int | None] = [None]
    seen: dict[int, tuple[int, int | None]] = {}
    # Weights saved for backward (a frozen linear's weight, to give its input a gradient) are the weights' memory.
    weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}

    def pack(tensor):
        storage = tensor.untyped_storage()
        size = storage.nbytes()
        key = storage._cdata
        if key in weights:
            return tensor
        if key not in seen or seen[key][0] < size:
            seen[key] = (int(size), seen.get(key, (0, current[0]))[1])
        return tensor

    hooks = []
    for index, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda _m, _a, i=index: current.__setitem__(0, i)))
        hooks.append(layer.register_forward_hook(lambda *_: current.__setitem__(0, None)))
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    inputs = {"input_ids": ids}
    if packing:  # the packing collator's block-diagonal mask
        inputs["attention_mask"] = torch.ones(batch, 1, seq, seq, dtype=torch.bool, device="meta")
    try:
        with _traced_kernels(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device="meta"),
                        output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    per_layer = [0] * len(layers)
    outside = 0
    for size, layer in seen.values():
        if layer is None:
            outside += size
        else:
            per_layer[layer] += size
    hidden = out.hidden_states[0]
    layer_input = hidden.numel() * hidden.element_size()
    return Trace(per_layer, outside, layer_input)


# --- the plan ---

@dataclass
class Layout:
    """Where the run goes: devices per node, nodes, the sharding strategy, and the expert-parallel degree."""

    gpus: int = 1
    nodes: int = 1
    strategy: str = "ddp"
    expert_parallel: int = 1
    device: str = "cuda"  # "cpu": plan a CPU process's resident set instead

    @property
    def world(self) -> int:
        return self.gpus * self.nodes


@dataclass
class Plan:
    """Peak bytes per device, by component, and the step's time estimate."""

    model_type: str
    layout: Layout
    components: dict[str, float]
    parameters: int
    trainable: int
    tokens_per_step: int
    flops_per_step: float
    kv_cache_per_token: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def training_peak(self) -> float:
        """Everything the step holds on the device, framework overhead included (what must fit)."""
        return sum(self.components.values())

    @property
    def allocated_peak(self) -> float:
        """The tensors alone: what torch.cuda.max_memory_allocated() reports."""
        return self.training_peak - self.components.get("framework", 0.0)

    def step_seconds(self, peak_flops: float, mfu: float) -> float:
        return self.flops_per_step / (peak_flops * mfu)


@dataclass
class _Parts:
    weights: float = 0.0
    gathered_layer: float = 0.0  # the largest decoder layer's unsharded weights (FSDP2/ZeRO-3 gather it)
    gathered_layer_without_experts: float = 0.0  # the same, when expert parallelism keeps the experts local
    experts: float = 0.0  # routed expert weights
    adapter: float = 0.0
    trainable: int = 0
    trainable_bytes: float = 0.0
    parameters: int = 0
    active_parameters: float = 0.0


def _is_routed_expert(name: str, param: nn.Parameter) -> bool:
    return param.dim() == 3 and ".experts." in name


def _count_parameters(model: nn.Module, load_in_4bit: bool, config) -> _Parts:
    parts = _Parts()
    quantizable = set()
    if load_in_4bit:
        head = model.get_output_embeddings()
        for module in model.modules():
            if type(module) is nn.Linear and module is not head:
                quantizable.add(id(module.weight))
    layers = decoder_layers(model)
    layer_of = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    layer_bytes = [0.0] * len(layers)
    expert_bytes = [0.0] * len(layers)
    experts_total = getattr(config, "n_routed_experts", None) or getattr(config, "num_experts", None) or 1
    experts_active = getattr(config, "num_experts_per_tok", None) or 1
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    for name, param in model.named_parameters():
        count = param.numel()
        parts.parameters += count
        size = count * (NF4_BYTES if id(param) in quantizable and not param.requires_grad else param.element_size())
        if load_in_4bit and param.dtype == torch.float16 and id(param) not in quantizable:
            size = count * 4  # an fp16 QLoRA base keeps its other weights in fp32 (prepare_model_for_kbit_training)
        if param.requires_grad:
            parts.trainable += count
            parts.trainable_bytes += count * param.element_size()
            parts.adapter += size
        elif _is_routed_expert(name, param):
            parts.experts += size
        else:
            parts.weights += size
        if id(param) in layer_of:
            layer_bytes[layer_of[id(param)]] += size
            if _is_routed_expert(name, param):
                expert_bytes[layer_of[id(param)]] += size
        if id(param) not in embeddings:
            share = experts_active / experts_total if _is_routed_expert(name, param) else 1.0
            parts.active_parameters += count * share
    parts.gathered_layer = max(layer_bytes, default=0.0)
    parts.gathered_layer_without_experts = max((a - e for a, e in zip(layer_bytes, expert_bytes)), default=0.0)
    return parts


def kv_cache_per_token(config, dtype_bytes: int) -> dict[str, float]:
    """Bytes of KV cache per token of context: as transformers caches it, and as MLA's latent (vLLM) where used."""
    layers = config.num_hidden_layers
    if getattr(config, "kv_lora_rank", None):  # MLA: transformers caches the expanded per-head keys and values
        heads = config.num_attention_heads
        expanded = heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
        latent = config.kv_lora_rank + config.qk_rope_head_dim
        return {"transformers": layers * expanded * dtype_bytes, "mla_latent": layers * latent * dtype_bytes}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return {"transformers": layers * 2 * kv_heads * head_dim * dtype_bytes}


def meta_training_model(recipe, config, full: bool = False):
    """The recipe's training model on the meta device: the base at its dtype, with the method's adapter added as the
    loop adds it (or every weight trainable, `full`), in train mode."""
    from transformers import AutoModelForCausalLM

    from ..models.loading import DTYPES
    from ..plugins import METHODS
    from ..train.fastlora import enable_fused_lora
    from ..tuners.methods import add_method

    cfg = recipe.train
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[recipe.model.dtype],
                                                 attn_implementation="sdpa")
    if full:
        model.requires_grad_(True)
    else:
        model = add_method(model, cfg)
        if cfg.fused_lora and METHODS[cfg.method].fuses and not cfg.qat and not recipe.model.load_in_4bit:
            enable_fused_lora(model)
    return model.train()


def plan_training(recipe, config, layout: Layout, full: bool = False) -> Plan:
    """The memory per device of one training step of `recipe` (on `config`), and its FLOPs."""
    from ..models.loading import DTYPES
    from ..train.loss import CHUNK_BYTES, output_head

    cfg = recipe.train
    if layout.strategy not in STRATEGIES:
        raise InputError(f"--strategy: {layout.strategy!r} is not one of: {', '.join(STRATEGIES)}")
    model = meta_training_model(recipe, config, full)
    load_in_4bit = recipe.model.load_in_4bit and not full
    parts = _count_parameters(model, load_in_4bit, config)
    dtype_bytes = DTYPES[recipe.model.dtype].itemsize
    seq = (cfg.pack_width or recipe.data.max_length) if cfg.packs else recipe.data.max_length
    batch = cfg.batch_size
    notes = []
    moe = parts.experts > 0
    trace = trace_activations(model, batch, seq, cfg.packs)
    world, shard = layout.world, 1
    strategy = layout.strategy
    components: dict[str, float] = {}
    if layout.expert_parallel > 1:  # each GPU keeps its share of the routed experts, never gathered
        experts, gathered = parts.experts / layout.expert_parallel, parts.gathered_layer_without_experts
    else:
        experts, gathered = parts.experts, parts.gathered_layer
    if strategy in ("fsdp2", "zero3"):
        shard = world
        if layout.expert_parallel == 1:
            experts /= world
        # A shard of everything, plus the layer being computed and the next one prefetched, whole.
        components["weights"] = parts.weights / world + experts + 2 * gathered * (world > 1)
    else:
        components["weights"] = parts.weights + experts
    components["adapter"] = parts.adapter / shard if not full else 0.0
    state_shard = world if strategy != "ddp" else 1
    components["gradients"] = parts.trainable_bytes / state_shard
    components["optimizer"] = 2 * parts.trainable_bytes / state_shard
    activations = trace.activations(cfg.gradient_checkpointing)
    components["activations"] = activations
    rows = batch * seq
    hidden = config.hidden_size
    vocab = config.vocab_size
    head = output_head(model)
    act_bytes = dtype_bytes
    if head is not None:  # one chunk of fp32 logits, its copy in the model's dtype, and the gathered hidden rows
        chunk_rows = min(rows, max(1, CHUNK_BYTES // (4 * vocab)))
        logits = chunk_rows * vocab * (4 + (act_bytes if act_bytes != 4 else 0))
        components["loss_head"] = logits + 2 * rows * hidden * act_bytes
    else:
        components["loss_head"] = rows * vocab * (4 + 4 + act_bytes)
    components["backward_working"] = max(trace.per_layer, default=0)
    if layout.device == "cpu":
        live = sum(v for k, v in components.items() if k not in ("weights", "adapter"))
        components["heap_overhead"] = live * (CPU_HEAP_OVERHEAD - 1.0)
    else:
        components["framework"] = CUDA_OVERHEAD
    # FLOPs: forward 2N per token, backward 2N for the input gradients (+2N for weight gradients when they train,
    # +2N to recompute with checkpointing), plus attention's QK^T and AV (causal: half of 4 * seq * width).
    passes = 2 + 2 + (2 if full else 0) + (2 if cfg.gradient_checkpointing else 0)
    heads_dim = getattr(config, "num_attention_heads", 1) * (
        getattr(config, "head_dim", None) or (getattr(config, "v_head_dim", None) or hidden // config.num_attention_heads))
    attention = config.num_hidden_layers * 2 * seq * heads_dim * (passes / 2)
    flops = rows * (passes * parts.active_parameters + attention)
    if moe and layout.expert_parallel == 1 and world > 1 and strategy in ("fsdp2", "zero3"):
        notes.append("routed experts are gathered layer by layer under FSDP2/ZeRO-3; --expert-parallel splits them")
    if layout.device == "cpu" and cfg.gradient_checkpointing:
        notes.append("with gradient checkpointing on CPUs glibc keeps each layer's recomputation buffers: the "
                     "resident set measured 2.7x this total's rise at 4 x 512 tokens (bench/plan_memory.py)")
    if load_in_4bit:
        notes.append("linear weights in NF4 with double quantization (bitsandbytes); the LM head, embeddings, norms "
                     "and fused expert weights stay in the model's dtype")
    return Plan(config.model_type, layout, components, parts.parameters, parts.trainable, rows, flops,
                kv_cache_per_token(config, dtype_bytes), notes)


def advise(recipe, config, layout: Layout, limit: float, plan: Plan) -> list[str]:
    """Knobs that bring the plan under `limit` bytes, each with the peak it gives (best first)."""
    tries = []
    train = recipe.train
    if not train.gradient_checkpointing:
        tries.append(("train.gradient_checkpointing=true", recipe.model_copy(update={
            "train": train.model_copy(update={"gradient_checkpointing": True})}), layout))
    if not recipe.model.load_in_4bit and train.method in ("lora", "dora"):
        tries.append(("model.load_in_4bit=true (QLoRA)", recipe.model_copy(update={
            "model": recipe.model.model_copy(update={"load_in_4bit": True})}), layout))
    experts = getattr(config, "n_routed_experts", None) or getattr(config, "num_experts", None)
    if experts and layout.expert_parallel == 1 and layout.world > 1:
        degree = max(d for d in range(1, layout.world + 1) if experts % d == 0 and layout.world % d == 0)
        tries.append((f"--strategy fsdp2 --expert-parallel {degree}", recipe,
                      Layout(layout.gpus, layout.nodes, "fsdp2", degree, layout.device)))
    if layout.world > 1 and layout.strategy in ("ddp", "zero2"):
        tries.append(("--strategy fsdp2", recipe, Layout(layout.gpus, layout.nodes, "fsdp2",
                                                        layout.expert_parallel, layout.device)))
    if train.batch_size > 1:
        half = max(1, train.batch_size // 2)
        tries.append((f"train.batch_size={half} train.grad_accum={train.grad_accum * 2}", recipe.model_copy(update={
            "train": train.model_copy(update={"batch_size": half, "grad_accum": train.grad_accum * 2})}), layout))
    results = []
    for label, changed, where in tries:
        peak = plan_training(changed, config, where).training_peak
        if peak < plan.training_peak:
            results.append((peak, f"{label}: {peak / 2**30:.1f} GiB{' (fits)' if peak <= limit else ''}"))
    return [text for _, text in sorted(results)]


def gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def render(plan: Plan, limit: float | None, peak_flops: float | None, mfu: float, advice: list[str],
           kv_tokens: int) -> str:
    """The plan as the terminal table `dstune plan` prints."""
    layout = plan.layout
    where = "CPU process (resident set)" if layout.device == "cpu" else (
        f"{layout.world} GPU{'s' if layout.world > 1 else ''} ({layout.nodes} node{'s' if layout.nodes > 1 else ''}"
        f" x {layout.gpus}), {layout.strategy}" + (f", expert parallel {layout.expert_parallel}"
                                                   if layout.expert_parallel > 1 else ""))
    lines = [f"{plan.model_type}: {plan.parameters / 1e9:.2f}B parameters, {plan.trainable / 1e6:.1f}M trainable; "
             f"{where}", "", f"{'peak per device':<20}{'GiB':>9}"]
    for name, value in plan.components.items():
        lines.append(f"  {name:<18}{gib(value):>9}")
    total = plan.training_peak
    lines.append(f"  {'total':<18}{gib(total):>9}" + (f"  of {gib(limit)}: {'fits' if total <= limit else 'DOES NOT FIT'}"
                                                       if limit else ""))
    kv = ", ".join(f"{gib(v * kv_tokens)} GiB {k}" for k, v in plan.kv_cache_per_token.items())
    lines.append(f"  {'kv cache (eval)':<18}{'':>9}  {kv_tokens} tokens: {kv}")
    if peak_flops:
        seconds = plan.step_seconds(peak_flops, mfu)
        rate = plan.tokens_per_step * layout.world / seconds if seconds else 0.0
        lines += ["", f"step ({plan.tokens_per_step} tokens per device): {plan.flops_per_step / 1e12:.1f} TFLOP "
                  f"per device, ~{seconds:.2f} s at {mfu:.0%} of {peak_flops / 1e12:.0f} TFLOP/s; "
                  f"~{rate:,.0f} tokens/s in all ({1e6 / rate / 60 if rate else math.inf:.1f} min per 1M tokens)"]
    for note in plan.notes:
        lines.append(f"note: {note}")
    if limit and total > limit:
        lines += ["", "to fit, try:"] + [f"  {item}" for item in advice] if advice else ["", "nothing tried fits"]
    return "\n".join(lines)


@dataclass
class PlanRequest:
    """What `dstune plan` was asked: the devices, the layout, and the model config to use."""

    gpus: int = 1
    nodes: int = 1
    gpu_memory: str | None = None
    gpu: str | None = None
    strategy: str = "auto"
    expert_parallel: int = 1
    config: str | None = None
    cpu: bool = False
    mfu: float = 0.4


def check_request(request: PlanRequest) -> None:
    """One line for each bad option, before any model config is read."""
    if request.gpus < 1 or request.nodes < 1:
        raise InputError("--gpus and --nodes: must be at least 1")
    if request.gpu and request.gpu not in GPUS:
        raise InputError(f"--gpu: {request.gpu!r} is not one of: {', '.join(GPUS)} (or give --gpu-memory)")
    if request.strategy not in ("auto", *STRATEGIES):
        raise InputError(f"--strategy: {request.strategy!r} is not one of: auto, {', '.join(STRATEGIES)}")
    if request.expert_parallel < 1 or request.expert_parallel > request.gpus * request.nodes:
        raise InputError("--expert-parallel: must be between 1 and the number of GPUs")
    if not 0 < request.mfu <= 1:
        raise InputError("--mfu: must be in (0, 1]")
    if request.gpu_memory:
        parse_bytes(request.gpu_memory)


def plan_recipe(recipe, request: PlanRequest) -> dict:
    """The plan of `recipe` for `request`: the table `dstune plan` prints, and the same numbers as a dict."""
    check_request(request)
    with warnings.catch_warnings():  # transformers' deprecation notes about its own internals
        warnings.simplefilter("ignore")
        return _plan_recipe(recipe, request)


def _plan_recipe(recipe, request: PlanRequest) -> dict:
    config = load_model_config(recipe.model.name_or_path, request.config, recipe.model.trust_remote_code)
    memory, tflops = GPUS.get(request.gpu, (None, None)) if request.gpu else (None, None)
    limit = parse_bytes(request.gpu_memory) if request.gpu_memory else (memory * 2**30 if memory else None)
    peak_flops = tflops * 1e12 if tflops else None
    device = "cpu" if request.cpu else "cuda"
    strategies = [request.strategy] if request.strategy != "auto" else (
        ["ddp"] if request.gpus * request.nodes == 1 else ["ddp", "fsdp2"])
    for strategy in strategies:  # auto: DDP when it fits, else FSDP2
        layout = Layout(request.gpus, request.nodes, strategy, request.expert_parallel, device)
        plan = plan_training(recipe, config, layout)
        if limit is None or plan.training_peak <= limit:
            break
    advice = advise(recipe, config, layout, limit, plan) if limit and plan.training_peak > limit else []
    kv_tokens = recipe.eval.batch_size * (recipe.data.max_length + recipe.eval.max_new_tokens)
    text = render(plan, limit, peak_flops, request.mfu, advice, kv_tokens)
    return {"model_type": plan.model_type, "strategy": layout.strategy, "world": layout.world,
            "parameters": plan.parameters, "trainable": plan.trainable,
            "components_bytes": {k: int(v) for k, v in plan.components.items()},
            "peak_bytes": int(plan.training_peak), "allocated_peak_bytes": int(plan.allocated_peak),
            "limit_bytes": int(limit) if limit else None,
            "fits": None if limit is None else plan.training_peak <= limit, "advice": advice,
            "flops_per_step": plan.flops_per_step, "tokens_per_step_per_device": plan.tokens_per_step,
            "kv_cache_bytes_per_token": plan.kv_cache_per_token, "notes": plan.notes, "table": text}
