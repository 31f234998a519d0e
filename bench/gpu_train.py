"""The training hot path on a GPU: HF forward with labels on padded batches vs dstune's packed, supervised-only path.

A Qwen2-1.5B-shaped model with random weights (nothing to download), bf16, SDPA attention, a peft LoRA of rank 16
on every dense linear. Each step trains on the same 16 samples on both sides, lengths 64-1024, a quarter of each
supervised. The sides alternate (A B A B A B) in one process; peak memory is reset between them.

- baseline: batches right-padded to their longest sample, `model(**batch, labels=...)`, full-vocabulary logits;
- dstune: `PackingCollator` rows (block-diagonal causal mask) and `supervised_lm_loss` (hidden states gathered at
  supervised positions, chunked LM head and cross-entropy).

MFU is useful FLOPs (real tokens through the frozen base, forward + activation gradients, causal attention, the LM
head on supervised tokens) per second over the bf16 GEMM peak measured in the same run.

    bash bench/gpu_train.sh                          # on the GPU machine: < 5 minutes
    python bench/gpu_train.py --smoke                # a tiny model on CPU, two steps: checks the script runs

`--smoke` writes to a temporary folder (or `--out`), never over bench/results/gpu_train.json.
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

from dstune.train.fastlora import enable_fused_lora  # noqa: E402
from dstune.train.loss import supervised_lm_loss  # noqa: E402
from dstune.train.packing import PackingCollator  # noqa: E402

QWEN2_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024, tie_word_embeddings=True)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_samples(n: int, vocab: int, low: int, high: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        length = int(torch.randint(low, high + 1, (1,), generator=gen))
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        answer = length // 4
        samples.append({"input_ids": ids, "labels": [-100] * (length - answer) + ids[-answer:]})
    return samples


def padded(samples: list[dict], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad)
    labels = torch.full((len(samples), width), -100)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def useful_flops(config, samples: list[dict]) -> float:
    h, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    d = h // heads
    kv = config.num_key_value_heads * d
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size)
    total = 0.0
    for s in samples:
        n = len(s["input_ids"])
        supervised = sum(1 for t in s["labels"][1:] if t != -100)
        total += 4 * linear * n + 3 * layers * 2 * n * n * h + 4 * config.vocab_size * h * supervised
    return total


def gemm_peak(device: str, dtype: torch.dtype) -> float:
    n = 8192 if device == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, fp32, 2 steps")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per repetition")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="samples per step")
    parser.add_argument("--out", help="the results file (default bench/results/gpu_train.json; --smoke: a temp folder)")
    args = parser.parse_args()
    if not args.out:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="dstune-smoke-gpu_train-")) if args.smoke else ROOT / "bench" / "results"
        args.out = str(folder / ("gpu_train-smoke.json" if args.smoke else "gpu_train.json"))
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    steps, reps = (2, 1) if args.smoke else (args.steps, args.repetitions)
    config = Qwen2Config(**(TINY if args.smoke else QWEN2_1_5B))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    fused = enable_fused_lora(model)  # used where dtypes agree (fp32); bf16 base + fp32 LoRA runs peft's path
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device == "cuda")
    low, high = (16, 64) if args.smoke else (64, 1024)
    batches = [make_samples(args.batch, config.vocab_size, low, high, seed) for seed in range(steps + 1)]
    collate = PackingCollator(0, high, "sdpa", dtype)

    def step(side: str, samples: list[dict]) -> float:
        if side == "baseline":
            batch = {k: v.to(device) for k, v in padded(samples, 0).items()}
            loss = model(**batch).loss
        else:
            batch = {k: v.to(device) for k, v in collate(samples).items()}
            loss_sum, count = supervised_lm_loss(model, batch)
            loss = loss_sum / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    # The same first batch on both sides: the losses agree (before any step changes the weights).
    model.eval()
    with torch.no_grad():
        reference = float(model(**{k: v.to(device) for k, v in padded(batches[0], 0).items()}).loss)
        loss_sum, count = supervised_lm_loss(model, {k: v.to(device) for k, v in collate(batches[0]).items()})
    model.train()
    peak = gemm_peak(device, dtype)
    runs = []
    for rep in range(reps):
        for side in ("baseline", "dstune"):
            step(side, batches[0])  # warm-up
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            start = time.perf_counter()
            for samples in batches[1:]:
                step(side, samples)
            sync(device)
            seconds = time.perf_counter() - start
            timed = [s for b in batches[1:] for s in b]
            tokens = sum(len(s["input_ids"]) for s in timed)
            supervised = sum(1 for s in timed for t in s["labels"][1:] if t != -100)
            runs.append({"side": side, "repetition": rep, "seconds": seconds, "tokens_per_second": tokens / seconds,
                         "supervised_tokens_per_second": supervised / seconds,
                         "mfu": useful_flops(config, timed) / seconds / peak,
                         "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None})
            print(json.dumps(runs[-1]), flush=True)
    medians = {}
    for side in ("baseline", "dstune"):
        rows = [r for r in runs if r["side"] == side]
        medians[side] = {k: statistics.median(r[k] for r in rows) for k in
                         ("tokens_per_second", "supervised_tokens_per_second", "mfu")}
        if device == "cuda":
            medians[side]["peak_memory_gb"] = statistics.median(r["peak_memory_gb"] for r in rows)
    result = {
        "benchmark": "gpu_train", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
        "torch": torch.__version__, "dtype": str(dtype), "model": "Qwen2-1.5B config, random weights",
        "gemm_peak_flops": peak, "fused_lora_layers": fused, "steps": steps, "batch_samples": args.batch,
        "first_batch_loss": {"padded_full_logits": reference, "packed_supervised": float(loss_sum / count)},
        "runs": runs, "medians": medians,
        "speedup_tokens_per_second": medians["dstune"]["tokens_per_second"] / medians["baseline"]["tokens_per_second"],
    }
    if device == "cuda":
        result["memory_ratio"] = medians["dstune"]["peak_memory_gb"] / medians["baseline"]["peak_memory_gb"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    print(f"bench/gpu_train: wrote {args.out}")


if __name__ == "__main__":
    main()
