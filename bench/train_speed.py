"""dstune's training hot path against HF Trainer + peft LoRA: same model, data, steps, samples and seed, in one run.

The baseline is what a user of the usual stack runs: `transformers.Trainer` with a peft LoRA (the demo's rank,
alpha, dropout, targets and learning rate), `DataCollatorForSeq2Seq` padding each batch to its longest sample, and
the model's own loss over full-vocabulary logits. dstune runs the same recipe through `dstune.train.train`: packing,
the fused LoRA linear, and the LM head on supervised positions only, in chunks.

Both see the same samples in the same order (the same seeded sampler), so they train on the same supervised tokens
for the same optimizer steps; the bench checks it. Each run is its own process (peak RSS is its own), and the sides
alternate, A B A B. Two data sets:
- icd10: the demo's train split (short: 30-60 tokens, 3-4 supervised);
- long: lists of 2-34 ICD-10-CM descriptions to code, ~70-950 tokens, 15-250 supervised.

    .venv/bin/python bench/train_speed.py --quick   # icd10, 3 steps, 3 repetitions (< 3 min)
    .venv/bin/python bench/train_speed.py           # both sets, 3 repetitions, and one run of each ablation

Writes bench/results/train_speed.json (or train_speed-quick.json) and prints the tables of docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import gemm_peak_flops, machine

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "icd10_lora.yaml"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Per data set: batch size, max_length, steps (full, quick), dev samples.
DATASETS = {
    "icd10": {"batch_size": 16, "max_length": 128, "steps": 20, "quick_steps": 3, "dev": 148, "quick_dev": 32},
    "long": {"batch_size": 4, "max_length": 1024, "steps": 8, "quick_steps": 2, "dev": 24, "quick_dev": 8},
}
# dstune with one lever off at a time (or gradient checkpointing on): the full mode runs each once.
VARIANTS = {
    "dstune": [],
    "dstune-no-packing": ["train.packing=false"],
    "dstune-no-fused-lora": ["train.fused_lora=false"],
    "dstune-full-head": [],  # the LM head through logits_to_keep on supervised columns, unchunked
    "dstune-checkpointing": ["train.gradient_checkpointing=true"],
}


# --- data ---

def make_long_set(folder: Path, n_train: int, n_dev: int, seed: int = 0) -> None:
    """Chat records that ask for the category of each of 2-34 ICD-10-CM descriptions (~70-950 tokens)."""
    from dstune.data.icd10 import _icd

    cm = _icd()
    leaves = [c for c in cm.get_all_codes(with_dots=True) if cm.is_leaf(c) and len(c) > 3]
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        with open(folder / f"{split}.jsonl", "w") as out:
            for i in range(n):
                codes = rng.sample(leaves, rng.randint(2, 34))
                question = "Give the ICD-10-CM category of each diagnosis, one per line.\n" + "\n".join(
                    f"{k + 1}. {cm.get_description(c)}" for k, c in enumerate(codes))
                answer = "\n".join(f"{k + 1}. {c.split('.')[0]}" for k, c in enumerate(codes))
                out.write(json.dumps({"id": f"{split}-{i}", "messages": [
                    {"role": "system", "content": "You are a clinical coder."},
                    {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}) + "\n")


# --- one side, in its own process ---

class BatchStats:
    """Wraps a collator: counts real, supervised and padded tokens, and the useful FLOPs of what it batches."""

    def __init__(self, collator, flops_per_sample):
        self.collator = collator
        self.flops_per_sample = flops_per_sample
        self.tokens = self.supervised = self.slots = 0
        self.flops = 0.0

    def __call__(self, samples):
        batch = self.collator(samples)
        for s in samples:
            supervised = sum(1 for t in s["labels"][1:] if t != -100)
            self.tokens += len(s["input_ids"])
            self.supervised += supervised
            self.flops += self.flops_per_sample(len(s["input_ids"]), supervised)
        self.slots += batch["input_ids"].numel()
        return batch

    def __getattr__(self, name):  # padding_fraction and the rest, from the wrapped collator
        return getattr(self.collator, name)


def useful_flops(config):
    """FLOPs a sample needs (frozen base: forward, and the backward to the activations, 2 + 2 per weight):
    every token through the decoder's linears, causal attention, the LM head on supervised tokens only."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = config.num_key_value_heads * head_dim
    linear = layers * (hidden * heads * head_dim + 2 * hidden * kv + heads * head_dim * hidden
                       + 3 * hidden * config.intermediate_size)
    head = config.vocab_size * hidden

    def per_sample(length: int, supervised: int) -> float:
        attention = layers * 2 * length * length * heads * head_dim  # QK^T and PV, causal half, forward
        return 4 * linear * length + 3 * attention + 4 * head * supervised

    return per_sample


def dev_loss(model, samples, pad_token_id: int) -> float:
    """Token-mean cross-entropy on the dev samples: the model's plain loss, the same code for both sides."""
    import torch

    from dstune.train.collate import CausalCollator

    collate = CausalCollator(pad_token_id)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(samples), 2):  # small batches: the full logits of this loss stay small
            batch = collate(samples[start:start + 2])
            n = int((batch["labels"][:, 1:] != -100).sum())
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], labels=batch["labels"])
            total += float(out.loss) * n
            count += n
    return total / count


def recipe_for(dataset: str, work: Path, side: str, steps: int):
    from dstune.config import load_recipe

    spec = DATASETS[dataset]
    overrides = [f"name=bench_{side}", f"output_dir={work}", f"train.max_steps={steps}", "train.eval_steps=0",
                 "train.logging_steps=1", f"train.batch_size={spec['batch_size']}",
                 f"data.max_length={spec['max_length']}", *VARIANTS.get(side, [])]
    return load_recipe(RECIPE, overrides)


def worker(side: str, dataset: str, work: Path, steps: int, dev_samples: int) -> dict:
    import torch

    from dstune.data.build import load_split
    from dstune.data.templates import get_template
    from dstune.models.loading import load_tokenizer, resolve_model_path
    from dstune.train import trainer as trainer_module

    data_dir = work / f"data-{dataset}"
    recipe = recipe_for(dataset, work, side, steps)
    model_path = resolve_model_path(recipe.model.name_or_path)
    tokenizer = load_tokenizer(model_path, False)
    template = get_template(recipe.model.template, tokenizer)
    dev = trainer_module.encode_records(load_split(data_dir, "dev")[:dev_samples], tokenizer, template,
                                        recipe.data.max_length)
    from transformers import AutoConfig

    per_sample = useful_flops(AutoConfig.from_pretrained(model_path))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    if side == "baseline":
        stats, model, seconds = run_baseline(recipe, data_dir, tokenizer, template, per_sample)
    else:
        made = []

        def counted(factory):
            def build(*args, **kwargs):
                made.append(BatchStats(factory(*args, **kwargs), per_sample))
                return made[-1]
            return build

        trainer_module.PackingCollator = counted(trainer_module.PackingCollator)
        trainer_module.CausalCollator = counted(trainer_module.CausalCollator)
        if side == "dstune-full-head":
            from dstune.train import loss

            loss.PLAIN_HEAD_MODELS = frozenset()
        result = trainer_module.train(recipe, data_dir)
        stats, model, seconds = made[0], result.model, result.summary["train_seconds"]
    after = resource.getrusage(resource.RUSAGE_SELF)  # the peak of training, before the dev loss adds its own
    return {
        "side": side, "dataset": dataset, "steps": steps,
        "train_seconds": seconds,
        "tokens": stats.tokens, "supervised_tokens": stats.supervised, "slots": stats.slots,
        "padding_fraction": 1 - stats.tokens / stats.slots,
        "tokens_per_second": stats.tokens / seconds,
        "supervised_tokens_per_second": stats.supervised / seconds,
        "useful_flops": stats.flops,
        "flops_per_second": stats.flops / seconds,
        "user_cpu_seconds": after.ru_utime - usage.ru_utime,
        "system_cpu_seconds": after.ru_stime - usage.ru_stime,
        "peak_rss_mb": after.ru_maxrss / 1024,
        "dev_loss": dev_loss(model, dev, tokenizer.pad_token_id),
        "torch_threads": torch.get_num_threads(),
    }


def run_baseline(recipe, data_dir, tokenizer, template, per_sample):
    """HF Trainer + peft LoRA with its defaults: padded batches, the model's loss on full-vocabulary logits."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from dstune.data.build import load_split
    from dstune.models.loading import resolve_model_path
    from dstune.train.trainer import encode_records

    cfg = recipe.train
    samples = encode_records(load_split(data_dir, "train"), tokenizer, template, recipe.data.max_length)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(recipe.model.name_or_path), dtype=torch.float32)
    set_seed(cfg.seed)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                             lora_dropout=cfg.lora.dropout, target_modules=TARGETS))
    stats = BatchStats(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100), per_sample)
    args = TrainingArguments(
        output_dir=str(recipe.run_dir / "hf"), per_device_train_batch_size=cfg.batch_size, max_steps=cfg.max_steps,
        learning_rate=cfg.resolved_learning_rate(), lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,
        max_grad_norm=cfg.max_grad_norm, logging_steps=1, save_strategy="no", report_to="none", seed=cfg.seed,
        data_seed=cfg.seed, use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=samples, data_collator=stats)
    start = time.perf_counter()
    trainer.train()
    return stats, model, time.perf_counter() - start


# --- the run ---

def run_side(side: str, dataset: str, work: Path, steps: int, dev: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", side, "--dataset", dataset, "--work", str(work),
                          "--steps", str(steps), "--dev", str(dev)], capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"bench/train_speed: {side} on {dataset} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def summarise(runs: list[dict]) -> dict:
    """Medians per (dataset, side), and each side's ratios to the baseline of its data set."""
    medians: dict[str, dict[str, dict]] = {}
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        medians[dataset] = {}
        for side in dict.fromkeys(r["side"] for r in runs if r["dataset"] == dataset):
            rows = [r for r in runs if r["dataset"] == dataset and r["side"] == side]
            keys = ["train_seconds", "tokens_per_second", "supervised_tokens_per_second", "flops_per_second",
                    "dev_loss", "peak_rss_mb", "padding_fraction", "user_cpu_seconds", "system_cpu_seconds"]
            m = {k: statistics.median(r[k] for r in rows) for k in keys}
            m["repetitions"] = len(rows)
            m["gemm_peak_fraction"] = m["flops_per_second"] / statistics.median(r["gemm_peak_flops"] for r in rows)
            m["system_cpu_fraction"] = m["system_cpu_seconds"] / (m["system_cpu_seconds"] + m["user_cpu_seconds"])
            medians[dataset][side] = m
        base = medians[dataset].get("baseline")
        for side, m in medians[dataset].items():
            if base:
                m["speedup_supervised_tokens_per_second"] = (m["supervised_tokens_per_second"]
                                                            / base["supervised_tokens_per_second"])
                m["peak_rss_ratio"] = m["peak_rss_mb"] / base["peak_rss_mb"]
                m["dev_loss_ratio"] = m["dev_loss"] / base["dev_loss"]
    return medians


def tables(medians: dict) -> str:
    lines = []
    for dataset, sides in medians.items():
        lines += [f"**{dataset}**", "",
                  "| side | supervised tok/s | tok/s | vs baseline | peak RSS (MB) | RSS ratio | dev loss | "
                  "loss ratio | padding | % of GEMM peak | system CPU | runs |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for side, m in sides.items():
            lines.append(
                f"| {side} | {m['supervised_tokens_per_second']:.1f} | {m['tokens_per_second']:.0f} | "
                f"{m.get('speedup_supervised_tokens_per_second', 1):.2f}x | {m['peak_rss_mb']:.0f} | "
                f"{m.get('peak_rss_ratio', 1):.2f} | {m['dev_loss']:.4f} | {m.get('dev_loss_ratio', 1):.3f} | "
                f"{100 * m['padding_fraction']:.1f}% | {100 * m['gemm_peak_fraction']:.1f} | "
                f"{100 * m['system_cpu_fraction']:.1f}% | {m['repetitions']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="icd10 only, 3 steps, 32 dev samples, no ablations (< 3 min)")
    parser.add_argument("--datasets", default=None,
                        help="comma-separated subset of " + ",".join(DATASETS) + " (the others' runs are kept)")
    parser.add_argument("--repetitions", type=int, default=3, help="baseline/dstune pairs per data set (default 3)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: per data set)")
    parser.add_argument("--no-ablations", action="store_true", help="skip the one-lever-off runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--dev", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.dataset, Path(args.work), args.steps, args.dev)
        print("RESULT " + json.dumps(result), flush=True)
        return

    from dstune import api
    from dstune.config import load_recipe

    datasets = (args.datasets or ("icd10" if args.quick else ",".join(DATASETS))).split(",")
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown:
        sys.exit(f"--datasets: unknown {unknown}; choose from {sorted(DATASETS)}")
    work = Path(tempfile.mkdtemp(prefix="dstune-bench-train-"))
    if "icd10" in datasets:
        api.data(load_recipe(RECIPE, ["name=icd10", f"output_dir={work}"]))
        (work / "icd10" / "data").rename(work / "data-icd10")
    if "long" in datasets:
        make_long_set(work / "data-long", 400, DATASETS["long"]["dev"])
    peak = gemm_peak_flops()
    result = {"benchmark": "train_speed", "mode": "quick" if args.quick else "full", "machine": machine(),
              "gemm_peak_flops": peak,
              "settings": {"recipe": str(RECIPE.relative_to(ROOT)), "datasets": {d: DATASETS[d] for d in datasets},
                           "repetitions": args.repetitions, "dtype": "float32",
                           "baseline": "transformers.Trainer + peft LoRA (r 16, alpha 32, dropout 0.05, q/k/v/o/"
                                       "gate/up/down), DataCollatorForSeq2Seq padding to the longest sample, "
                                       "the model's loss on full-vocabulary logits, default TrainingArguments",
                           "dstune": "dstune.train.train with the demo recipe: packing, fused LoRA, chunked "
                                     "supervised-only LM head", "variants": VARIANTS},
              "runs": []}
    out_path = ROOT / "bench" / "results" / ("train_speed-quick.json" if args.quick else "train_speed.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if args.datasets and out_path.exists():
        # A subset re-run keeps the other data sets' runs; each data set's ratios come from its own run.
        earlier = json.loads(out_path.read_text())
        for row in earlier["runs"]:
            row.setdefault("gemm_peak_flops", earlier["gemm_peak_flops"])
        result["runs"] = [r for r in earlier["runs"] if r["dataset"] not in datasets]
        result["settings"]["datasets"] = {**earlier["settings"]["datasets"], **result["settings"]["datasets"]}
    for dataset in datasets:
        spec = DATASETS[dataset]
        steps = args.steps or (spec["quick_steps"] if args.quick else spec["steps"])
        dev = spec["quick_dev"] if args.quick else spec["dev"]
        order = [side for _ in range(args.repetitions) for side in ("baseline", "dstune")]
        if not (args.quick or args.no_ablations):
            order += [v for v in VARIANTS if v != "dstune"]
        for side in order:
            print(f"bench/train_speed: {dataset} {side} ({steps} steps)", flush=True)
            row = run_side(side, dataset, work, steps, dev)
            row["gemm_peak_flops"] = peak
            result["runs"].append(row)
            print(f"  {row['supervised_tokens_per_second']:.1f} supervised tok/s, {row['tokens_per_second']:.0f} "
                  f"tok/s, dev loss {row['dev_loss']:.4f}, peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
            result["medians"] = summarise(result["runs"])
            out_path.write_text(json.dumps(result, indent=2))  # kept even if a later run fails
        same = {(r["supervised_tokens"], r["tokens"]) for r in result["runs"] if r["dataset"] == dataset}
        if len(same) != 1:
            sys.exit(f"bench/train_speed: the sides saw different tokens on {dataset}: {sorted(same)}")
    print("\n" + tables(result["medians"]))
    print(f"bench/train_speed: wrote {out_path.relative_to(ROOT)} (GEMM peak {peak / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
