"""14B QLoRA on one GPU against `dstune plan`: peak memory measured beside the planner's prediction, and MFU.

A DeepSeek-R1-Distill-Qwen-14B-shaped model (the shipped config) with random weights, built on the meta device and
materialised one linear at a time straight into NF4 (bitsandbytes), so no 28 GB bf16 copy ever exists. Then the
recipe's LoRA (recipes/deepseek_r1_14b_qlora.yaml: r16 on every linear, fp32 adapters), gradient checkpointing, and
training steps of one packed row of 2048 tokens, all supervised, through dstune's loss (the chunked supervised head).
`torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()` following the load is the measurement; the
planner's `allocated_peak` (tensors only, no CUDA context) is the prediction. MFU is the step's FLOPs (the planner's
count) per second over the bf16 GEMM peak measured in the same run.

Two more checks, each skipped with its reason when its library is missing:
- FSDP2 + QLoRA on one process (axolotl #2992): after `fully_shard`, the linears are still 4-bit (Params4bit with a
  quant_state) and the model's memory did not grow;
- DeepSpeed ZeRO-3: one training step of a small LoRA model on one process.

    bash bench/gpu_all.sh                 # on the GPU machine, with the other GPU checks (< 5 minutes)
    python bench/gpu_scale.py --smoke     # a tiny Qwen2 on CPU (bitsandbytes' CPU backend): checks the script runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from gpu_train import gemm_peak, sync  # noqa: E402  (the GEMM ceiling and the sync of gpu_train.py)

RECIPE = ROOT / "recipes" / "deepseek_r1_14b_qlora.yaml"
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1000}


def importable(name: str) -> str | None:
    """None when `name` imports here, else why not (one line)."""
    try:
        __import__(name)
    except Exception as exc:  # a broken native library raises all sorts of errors
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def quantized_random_model(config, device: str, dtype: torch.dtype):
    """The model with random weights, every decoder linear built straight into NF4, one at a time."""
    import bitsandbytes as bnb
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child is head:
                continue
            quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=dtype, quant_type="nf4", device="meta")
            weight = torch.randn(child.out_features, child.in_features, dtype=dtype, device=device) * 0.02
            quantized.weight = bnb.nn.Params4bit(weight.cpu() if device == "cpu" else weight, requires_grad=False,
                                                 quant_type="nf4", compress_statistics=True).to(device)
            if child.bias is not None:
                quantized.bias = nn.Parameter(torch.zeros(child.out_features, dtype=dtype, device=device),
                                              requires_grad=False)
            setattr(module, child_name, quantized)
            del weight
    # Embeddings, norms and the LM head: real memory now, small beside the linears.
    for module in model.modules():
        for key, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                value = torch.empty(param.shape, dtype=param.dtype, device=device).normal_(0, 0.02)
                if "norm" in type(module).__name__.lower():
                    value.fill_(1.0)
                setattr(module, key, nn.Parameter(value, requires_grad=False))
        for key, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                module.register_buffer(key, torch.zeros(buffer.shape, dtype=buffer.dtype, device=device))
    rotary = [m for m in model.modules() if hasattr(m, "inv_freq") and hasattr(m, "rope_init_fn")]
    for module in rotary:  # recompute the rotary frequencies zeroed above
        inv_freq, scaling = module.rope_init_fn(module.config, device)
        module.register_buffer("inv_freq", inv_freq, persistent=False)
        module.original_inv_freq = inv_freq
        module.attention_scaling = scaling
    model.is_loaded_in_4bit = True
    return model


def qlora_step_memory(args, device: str, dtype: torch.dtype) -> dict:
    """Peak allocated memory and MFU of QLoRA training steps, beside the planner's prediction."""
    from dstune.config import load_recipe
    from dstune.scale.plan import Layout, load_model_config, plan_training
    from dstune.train.loss import supervised_lm_loss
    from dstune.tuners.methods import add_method

    overrides = [] if not args.smoke else ["data.max_length=64", "train.pack_width=64", "model.dtype=float32"]
    recipe = load_recipe(RECIPE, overrides)
    config = load_model_config(recipe.model.name_or_path)
    if args.smoke:
        for key, value in TINY.items():
            setattr(config, key, value)
    seq = recipe.train.pack_width or recipe.data.max_length
    predicted = plan_training(recipe, config, Layout(device="cuda" if device == "cuda" else "cpu"))
    torch.manual_seed(0)
    start = time.perf_counter()
    model = quantized_random_model(config, device, dtype)
    model = add_method(model, recipe.train)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    load_seconds = time.perf_counter() - start
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(3, config.vocab_size, (1, seq), device=device)
    batch = {"input_ids": ids, "labels": ids}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync(device)
        begin = time.perf_counter()
        loss, count = supervised_lm_loss(model, batch)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - begin)
    measured = torch.cuda.max_memory_allocated() if device == "cuda" else None
    step = statistics.median(times[1:] if len(times) > 1 else times)
    peak = gemm_peak(device, dtype)
    return {"model": "DeepSeek-R1-Distill-Qwen-14B shape" if not args.smoke else "tiny Qwen2",
            "parameters": predicted.parameters, "trainable": predicted.trainable, "tokens": seq,
            "load_seconds": load_seconds, "step_seconds": step,
            "measured_peak_allocated_gb": measured / 2**30 if measured else None,
            "predicted_peak_allocated_gb": predicted.allocated_peak / 2**30,
            "predicted_components_gb": {k: v / 2**30 for k, v in predicted.components.items()},
            "prediction_error": predicted.allocated_peak / measured - 1 if measured else None,
            "goal_11gb_met": measured / 1e9 <= 11 if measured else None,
            "gemm_peak_flops": peak, "mfu": predicted.flops_per_step / step / peak,
            "losses_finite": bool(torch.isfinite(loss).item())}


def fsdp2_keeps_4bit(device: str, dtype: torch.dtype) -> dict:
    """fully_shard a 4-bit LoRA model on one process: are its linears still NF4, and its memory the same?"""
    import os

    import bitsandbytes as bnb
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from dstune.config import load_recipe
    from dstune.scale.plan import load_model_config
    from dstune.tuners.methods import add_method

    config = load_model_config("deepseek-r1-distill-qwen-14b")
    for key, value in TINY.items():
        setattr(config, key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    model = add_method(quantized_random_model(config, device, dtype),
                       load_recipe(RECIPE, ["model.dtype=float32"] if device == "cpu" else []).train)
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    except Exception as exc:  # the failure is the finding
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    finally:
        dist.destroy_process_group()
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    kept = [m for m in linears if getattr(m.weight, "quant_state", None) is not None and m.weight.dtype == torch.uint8]
    after = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"ok": bool(linears) and len(kept) == len(linears) and after <= before * 1.01,
            "linears": len(linears), "still_4bit": len(kept), "bytes_before": before, "bytes_after": after}


def deepspeed_zero3_step(device: str) -> dict:
    """One ZeRO-3 training step of a tiny LoRA model on one process."""
    import os

    import deepspeed
    from transformers import AutoModelForCausalLM, Qwen2Config

    from dstune.config import load_recipe
    from dstune.tuners.methods import add_method

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29534")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    model = add_method(AutoModelForCausalLM.from_config(Qwen2Config(**TINY)), load_recipe(RECIPE).train)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": True},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                     if p.requires_grad], config=config)
    ids = torch.randint(3, 1000, (1, 64), device=engine.device)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return {"ok": bool(torch.isfinite(loss).item()), "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny Qwen2 on CPU: checks the script runs")
    parser.add_argument("--steps", type=int, default=4, help="training steps (the first is not timed; default 4)")
    parser.add_argument("--out", help="where to write the results JSON (default bench/results/gpu_scale.json)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        args.steps = 2
    result = {"benchmark": "gpu_scale", "mode": "smoke" if args.smoke else "full", "device": device,
              "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "torch": torch.__version__}
    missing = {name: importable(name) for name in ("bitsandbytes", "deepspeed", "liger_kernel")}
    result["libraries"] = {name: problem or "ok" for name, problem in missing.items()}
    checks = [("qlora_14b", "bitsandbytes", lambda: qlora_step_memory(args, device, dtype)),
              ("fsdp2_qlora", "bitsandbytes", lambda: fsdp2_keeps_4bit(device, dtype)),
              ("deepspeed_zero3", "deepspeed", lambda: deepspeed_zero3_step(device))]
    for name, needs, run in checks:
        if missing[needs]:
            result[name] = {"skipped": f"{needs} is not importable here ({missing[needs]})"}
        elif name == "deepspeed_zero3" and device != "cuda":
            result[name] = {"skipped": "DeepSpeed ZeRO-3 runs on GPUs here (its CPU path needs oneCCL)"}
        else:
            result[name] = run()
        print(name, json.dumps(result[name]), flush=True)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / "gpu_scale.json"
    if args.smoke and not args.out:
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="dstune-smoke-gpu_scale-")) / "gpu_scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
