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

`--baseline-rev REV` adds a third side: dstune at commit REV, from a detached `git worktree` of it, run by this
same script's worker with that tree's `src/` first on PYTHONPATH and that tree's demo recipe, under the same
overrides (each side imports its own dstune; the bench checks which). The sides then alternate A B C A B C, and each
side's medians carry their ratio to REV (new/old) as well as to HF (new/HF). Every side is measured by the same
code, which reaches dstune only through public names: the stage `dstune.train.train` and its summary, and the
collators of `dstune.train`, whose batches give the FLOPs.

    .venv/bin/python bench/train_speed.py --quick   # icd10, 3 steps, 3 repetitions (< 3 min)
    .venv/bin/python bench/train_speed.py           # both sets, 3 repetitions, and one run of each ablation
    .venv/bin/python bench/train_speed.py --quick --baseline-rev main --repeats 5   # this tree against main
    .venv/bin/python bench/train_speed.py --smoke   # a tiny random Llama, 2 steps, 1 repetition (seconds)

Writes bench/results/train_speed.json (or train_speed-quick.json; `--out` elsewhere) and prints the tables of
docs/performance.md. `--smoke` runs the same code on a tiny random Llama (the SmolLM2 tokenizer) and a small chat
set built by the data stage in the icd10 set's place, and writes to a temporary folder, never to bench/results/.
It runs the HF and working-tree sides in its own process (the same worker, called with the same arguments: a
process costs ~6 s of imports here), so its peak RSS figures mean nothing; a `--baseline-rev` side always gets its
own process, since it imports another tree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import gemm_peak_flops, machine, peak_rss_mb, smoke_data, smoke_dir, smoke_model

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "icd10_lora.yaml"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Per data set: batch size, max_length, steps (full, quick), dev samples.
DATASETS = {
    "icd10": {"batch_size": 16, "max_length": 128, "steps": 20, "quick_steps": 3, "dev": 148, "quick_dev": 32},
    "long": {"batch_size": 4, "max_length": 1024, "steps": 8, "quick_steps": 2, "dev": 24, "quick_dev": 8},
}
# --smoke: a small chat set (common.smoke_data) in the icd10 set's place, small batches, 2 steps.
SMOKE = {"batch_size": 4, "max_length": 128, "steps": 2, "dev": 4}
# dstune with one lever off at a time (or gradient checkpointing on): the full mode runs each once.
VARIANTS = {
    "dstune": [],
    "dstune-no-packing": ["train.packing=false"],
    "dstune-no-fused-lora": ["train.fused_lora=false"],
    "dstune-full-head": [],  # the LM head through logits_to_keep on supervised columns, unchunked
    "dstune-checkpointing": ["train.gradient_checkpointing=true"],
}
# Per side: the median of each of MEDIAN_KEYS, and the spread (min, quartiles, max) of each of SPREAD_KEYS.
MEDIAN_KEYS = ["train_seconds", "tokens_per_second", "supervised_tokens_per_second", "flops_per_second", "dev_loss",
               "peak_rss_mb", "padding_fraction", "user_cpu_seconds", "system_cpu_seconds"]
SPREAD_KEYS = ["supervised_tokens_per_second", "tokens_per_second", "peak_rss_mb", "dev_loss", "train_seconds"]


# --- data ---

def make_long_set(folder: Path, n_train: int, n_dev: int, seed: int = 0) -> None:
    """Chat records that ask for the category of each of 2-34 ICD-10-CM descriptions (~70-950 tokens)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package imports the deprecated pkg_resources
        import simple_icd_10_cm as cm

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


def encode_samples(records: list[dict], tokenizer, template, max_length: int) -> list[dict]:
    """input_ids and labels of each record, encoded as dstune's train stage encodes them (its public data API)."""
    from dstune.data.tokenize import encode_conversation, encode_text

    encoded = [encode_text(tokenizer, r["text"], str(r["id"]), max_length) if "text" in r
               else encode_conversation(tokenizer, template, r["messages"], str(r["id"]), max_length) for r in records]
    return [{"input_ids": s.input_ids, "labels": s.labels} for s in encoded]


# --- one side, in its own process ---

class BatchStats:
    """Per collated batch: its real, supervised and padded tokens, and the useful FLOPs its samples need.

    Loaders collate one batch ahead (accelerate's prefetch), so a run collates more batches than it trains:
    `trained` sums only the first ones, those the optimizer steps saw.
    """

    def __init__(self, flops_per_sample):
        self.flops_per_sample = flops_per_sample
        self.batches: list[dict] = []

    def add(self, samples: list[dict], batch: dict) -> None:
        supervised = [sum(1 for t in s["labels"][1:] if t != -100) for s in samples]
        self.batches.append({
            "tokens": sum(len(s["input_ids"]) for s in samples), "supervised": sum(supervised),
            "slots": batch["input_ids"].numel(),
            "flops": sum(self.flops_per_sample(len(s["input_ids"]), n) for s, n in zip(samples, supervised))})

    def trained(self, batches: int) -> dict:
        """Totals of the first `batches` batches."""
        return {k: sum(b[k] for b in self.batches[:batches]) for k in ("tokens", "supervised", "slots", "flops")}

    def trained_until(self, tokens: int, supervised: int) -> dict | None:
        """Totals of the first batches that hold exactly these tokens (what a stage's summary reports), or None."""
        for n in range(len(self.batches) + 1):
            totals = self.trained(n)
            if totals["tokens"] >= tokens:
                return totals if (totals["tokens"], totals["supervised"]) == (tokens, supervised) else None
        return None


class CountingCollator:
    """The baseline's collator, given only the fields it pads (input_ids, labels), with BatchStats counting."""

    def __init__(self, collator, stats: BatchStats):
        self.collator = collator
        self.stats = stats

    def __call__(self, samples):
        # DataCollatorForSeq2Seq pads every field it is given, and fails on any that is not a token list.
        batch = self.collator([{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples])
        self.stats.add(samples, batch)
        return batch


@contextlib.contextmanager
def counting_dstune_batches(stats: BatchStats):
    """Count what dstune's public collators batch while the train stage runs (only the FLOPs need per-sample
    lengths; the token counts come from the stage's summary)."""
    import dstune.train as stage

    patched = []
    for name in ("PackingCollator", "CausalCollator"):
        cls = getattr(stage, name, None)
        if cls is None or "__call__" not in vars(cls):
            continue
        original = cls.__call__

        def counted(self, samples, _original=original):
            batch = _original(self, samples)
            stats.add(samples, batch)
            return batch

        cls.__call__ = counted
        patched.append((cls, original))
    try:
        yield
    finally:
        for cls, original in patched:
            cls.__call__ = original


@contextlib.contextmanager
def full_head(enabled: bool):
    """The dstune-full-head ablation: no model type takes the chunked supervised-only head."""
    if not enabled:
        yield
        return
    from dstune.train import loss

    saved = loss.PLAIN_HEAD_MODELS
    loss.PLAIN_HEAD_MODELS = frozenset()
    try:
        yield
    finally:
        loss.PLAIN_HEAD_MODELS = saved


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

    from dstune.train import CausalCollator

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


def dataset_spec(dataset: str, smoke: bool) -> dict:
    """Batch size, max_length, steps and dev samples of a data set (--smoke: its small settings)."""
    return {**DATASETS[dataset], **(SMOKE if smoke else {})}


def own_recipe() -> Path:
    """The demo recipe of the tree whose dstune this process imports: a --baseline-rev side reads its own, so a
    recipe key added since REV does not stop it (the overrides below set what both sides must share)."""
    import dstune

    own = Path(dstune.__file__).resolve().parents[2] / "recipes" / RECIPE.name
    return own if own.is_file() else RECIPE


def recipe_for(dataset: str, work: Path, side: str, steps: int, smoke: bool = False, model: str | None = None):
    """The demo recipe with this run's data set, steps, output folder and side's levers (and --smoke's model)."""
    from dstune.config import load_recipe

    spec = dataset_spec(dataset, smoke)
    overrides = [f"name=bench_{side.replace('@', '_')}", f"output_dir={work}", f"train.max_steps={steps}",
                 "train.eval_steps=0", "train.logging_steps=1", f"train.batch_size={spec['batch_size']}",
                 "train.objective=sft",
                 f"data.max_length={spec['max_length']}", *VARIANTS.get(side, [])]
    if model:
        overrides.append(f"model.name_or_path={model}")
    return load_recipe(own_recipe(), overrides)


def worker(side: str, dataset: str, work: Path, steps: int, dev_samples: int, smoke: bool = False,
           model: str | None = None) -> dict:
    """Train one side and measure it; `side` is baseline, dstune, one of VARIANTS, or dstune@<commit>."""
    import torch
    from transformers import AutoConfig

    import dstune
    from dstune.data.build import load_split
    from dstune.data.templates import get_template
    from dstune.models.loading import load_tokenizer, resolve_model_path

    data_dir = work / f"data-{dataset}"
    recipe = recipe_for(dataset, work, side, steps, smoke, model)
    model_path = resolve_model_path(recipe.model.name_or_path)
    tokenizer = load_tokenizer(model_path, False)
    template = get_template(recipe.model.template, tokenizer)
    dev = encode_samples(load_split(data_dir, "dev")[:dev_samples], tokenizer, template, recipe.data.max_length)
    stats = BatchStats(useful_flops(AutoConfig.from_pretrained(model_path)))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    if side == "baseline":
        trained, seconds, batches = run_baseline(recipe, data_dir, tokenizer, template, stats)
        totals = stats.trained(batches)
        tokens, supervised, slots, flops = totals["tokens"], totals["supervised"], totals["slots"], totals["flops"]
    else:
        from dstune.train import train

        with counting_dstune_batches(stats), full_head(side == "dstune-full-head"):
            result = train(recipe, data_dir)
        summary, trained = result.summary, result.model
        seconds, tokens, supervised = summary["train_seconds"], summary["tokens"], summary["supervised_tokens"]
        # Slots and FLOPs need each batch: taken from the collators if their first batches hold what the stage
        # reports it trained, else the slots from the summary's padding fraction, and no FLOPs.
        totals = stats.trained_until(tokens, supervised)
        if totals:
            slots, flops = totals["slots"], totals["flops"]
        else:
            slots, flops = round(tokens / (1 - summary["padding_fraction"])), None
    after = resource.getrusage(resource.RUSAGE_SELF)
    peak = peak_rss_mb()  # the peak of training, before the dev loss adds its own
    return {
        "side": side, "dataset": dataset, "steps": steps,
        "dstune_source": str(Path(dstune.__file__).resolve().parent.parent), "recipe": str(own_recipe()),
        "train_seconds": seconds,
        "tokens": tokens, "supervised_tokens": supervised, "slots": slots,
        "padding_fraction": 1 - tokens / slots,
        "tokens_per_second": tokens / seconds,
        "supervised_tokens_per_second": supervised / seconds,
        "useful_flops": flops,
        "flops_per_second": flops / seconds if flops is not None else None,
        "user_cpu_seconds": after.ru_utime - usage.ru_utime,
        "system_cpu_seconds": after.ru_stime - usage.ru_stime,
        "peak_rss_mb": peak,
        "dev_loss": dev_loss(trained, dev, tokenizer.pad_token_id),
        "torch_threads": torch.get_num_threads(),
    }


def run_baseline(recipe, data_dir, tokenizer, template, stats: BatchStats):
    """HF Trainer + peft LoRA with its defaults: padded batches, the model's loss on full-vocabulary logits.

    Returns the trained model, the seconds of `Trainer.train` and the batches it trained on."""
    import time

    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from dstune.data.build import load_split
    from dstune.models.loading import resolve_model_path

    cfg = recipe.train
    samples = encode_samples(load_split(data_dir, "train"), tokenizer, template, recipe.data.max_length)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(recipe.model.name_or_path), dtype=torch.float32)
    set_seed(cfg.seed)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                             lora_dropout=cfg.lora.dropout, target_modules=TARGETS))
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100), stats)
    args = TrainingArguments(
        output_dir=str(recipe.run_dir / "hf"), per_device_train_batch_size=cfg.batch_size, max_steps=cfg.max_steps,
        learning_rate=cfg.resolved_learning_rate(), lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,
        max_grad_norm=cfg.max_grad_norm, logging_steps=1, save_strategy="no", report_to="none", seed=cfg.seed,
        data_seed=cfg.seed, use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=samples, data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return model, seconds, trainer.state.global_step * args.gradient_accumulation_steps


# --- the run ---

def worker_args(side: str, dataset: str, work: Path, steps: int, dev: int, smoke: bool, model: str | None) -> list:
    """The command line of one side's worker."""
    argv = ["--worker", side, "--dataset", dataset, "--work", str(work), "--steps", str(steps), "--dev", str(dev)]
    return argv + (["--model", model] if model else []) + (["--smoke"] if smoke else [])


def run_worker(argv: list[str]) -> dict:
    """The worker of a parsed command line (the child process's entry, and --smoke's in-process call)."""
    args = parser().parse_args(argv)
    return worker(args.worker, args.dataset, Path(args.work), args.steps, args.dev, args.smoke, args.model)


def run_side(argv: list[str], src: Path, in_process: bool = False) -> dict:
    """One side's row: the worker in a child process whose dstune is imported from `src` (or in this one)."""
    if in_process:
        import dstune

        here = Path(dstune.__file__).resolve().parent.parent
        if here != src.resolve():
            sys.exit(f"bench/train_speed: this process imports dstune from {here}, not {src}")
        return json.loads(json.dumps(run_worker(argv)))  # the child's JSON round trip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"bench/train_speed: {' '.join(argv[1:4:2])} failed:\n{out.stderr[-3000:]}")
    row = json.loads(lines[-1][len("RESULT "):])
    if Path(row["dstune_source"]) != src.resolve():
        sys.exit(f"bench/train_speed: {argv[1]} imported dstune from {row['dstune_source']}, not {src}")
    return row


def checkout_rev(rev: str, folder: Path) -> str:
    """A detached worktree of commit `rev` at `folder`; its full commit id."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True, text=True,
                         cwd=ROOT)
    if sha.returncode:
        sys.exit(f"--baseline-rev: {rev!r} is not a commit of {ROOT} ({sha.stderr.strip()})")
    added = subprocess.run(["git", "worktree", "add", "--detach", str(folder), sha.stdout.strip()],
                           capture_output=True, text=True, cwd=ROOT)
    if added.returncode:
        sys.exit(f"--baseline-rev: git worktree add failed: {added.stderr.strip()}")
    return sha.stdout.strip()


def spread(values: list[float]) -> dict:
    """min, quartiles and max of the repetitions."""
    if len(values) < 2:
        return {"min": values[0], "q1": values[0], "q3": values[0], "max": values[0]}
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"min": min(values), "q1": q1, "q3": q3, "max": max(values)}


def median_of(rows: list[dict], key: str):
    """The median of a key over the rows that have it (None where none has)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[dict], rev_side: str | None = None) -> dict:
    """Medians and spreads per (dataset, side); each side's ratios to the HF baseline and to the REV side."""
    medians: dict[str, dict[str, dict]] = {}
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        medians[dataset] = {}
        for side in dict.fromkeys(r["side"] for r in runs if r["dataset"] == dataset):
            rows = [r for r in runs if r["dataset"] == dataset and r["side"] == side]
            m = {k: median_of(rows, k) for k in MEDIAN_KEYS}
            m["repetitions"] = len(rows)
            m["spread"] = {k: spread([r[k] for r in rows]) for k in SPREAD_KEYS}
            m["gemm_peak_fraction"] = (m["flops_per_second"] / median_of(rows, "gemm_peak_flops")
                                       if m["flops_per_second"] is not None else None)
            m["system_cpu_fraction"] = m["system_cpu_seconds"] / (m["system_cpu_seconds"] + m["user_cpu_seconds"])
            medians[dataset][side] = m
        for prefix, reference in (("", "baseline"), ("rev_", rev_side)):
            base = medians[dataset].get(reference) if reference else None
            if not base:
                continue
            for m in medians[dataset].values():
                m[f"{prefix}speedup_supervised_tokens_per_second"] = (m["supervised_tokens_per_second"]
                                                                      / base["supervised_tokens_per_second"])
                m[f"{prefix}peak_rss_ratio"] = m["peak_rss_mb"] / base["peak_rss_mb"]
                m[f"{prefix}dev_loss_ratio"] = m["dev_loss"] / base["dev_loss"]
    return medians


def comparison(medians: dict, rev_side: str) -> dict:
    """Per data set: the working tree's dstune over dstune at REV (new/old), and over HF Trainer (new/HF)."""
    out = {}
    for dataset, sides in medians.items():
        new, old, hf = sides.get("dstune"), sides.get(rev_side), sides.get("baseline")
        if not new:
            continue
        out[dataset] = {}
        for name, ref in (("new_over_old", old), ("new_over_hf", hf)):
            if ref:
                out[dataset][name] = {k: new[k] / ref[k] for k in ("supervised_tokens_per_second", "peak_rss_mb",
                                                                   "dev_loss")}
    return out


def tables(medians: dict, rev_side: str | None = None) -> str:
    """The markdown tables of docs/performance.md, one per data set."""
    lines = []
    for dataset, sides in medians.items():
        rev = rev_side if rev_side in sides else None
        lines += [f"**{dataset}**", "",
                  "| side | supervised tok/s | min-max | tok/s | vs baseline | " + (f"vs {rev} | " if rev else "")
                  + "peak RSS (MB) | RSS ratio | dev loss | loss ratio | padding | % of GEMM peak | system CPU | "
                    "runs |",
                  "|---|---|---|---|---|" + ("---|" if rev else "") + "---|---|---|---|---|---|---|---|"]
        for side, m in sides.items():
            s = m["spread"]["supervised_tokens_per_second"]
            gemm = f"{100 * m['gemm_peak_fraction']:.1f}" if m["gemm_peak_fraction"] is not None else "n/a"
            lines.append(
                f"| {side} | {m['supervised_tokens_per_second']:.1f} | {s['min']:.1f}-{s['max']:.1f} | "
                f"{m['tokens_per_second']:.0f} | {m.get('speedup_supervised_tokens_per_second', 1):.2f}x | "
                + (f"{m.get('rev_speedup_supervised_tokens_per_second', 1):.2f}x | " if rev else "")
                + f"{m['peak_rss_mb']:.0f} | {m.get('peak_rss_ratio', 1):.2f} | {m['dev_loss']:.4f} | "
                f"{m.get('dev_loss_ratio', 1):.3f} | {100 * m['padding_fraction']:.1f}% | {gemm} | "
                f"{100 * m['system_cpu_fraction']:.1f}% | {m['repetitions']} |")
        lines.append("")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line (the workers' hidden arguments included)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="icd10 only, 3 steps, 32 dev samples, no ablations (< 3 min)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny random Llama, a small chat set, 2 steps, 1 repetition; results to a temp folder")
    p.add_argument("--model", help="--smoke: a tiny model folder built already (default: build one)")
    p.add_argument("--datasets", default=None,
                   help="comma-separated subset of " + ",".join(DATASETS) + " (the others' runs are kept)")
    p.add_argument("--repetitions", "--repeats", dest="repetitions", type=int,
                   help="rounds of alternating sides per data set (default 3; 5 with --baseline-rev; 1 with --smoke)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: per data set)")
    p.add_argument("--no-ablations", action="store_true", help="skip the one-lever-off runs")
    p.add_argument("--baseline-rev", metavar="REV",
                   help="also run dstune at commit REV (a detached git worktree), and report new/old ratios")
    p.add_argument("--out", help="the results file (default bench/results/train_speed[-quick].json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--dev", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    """A worker's run, or the whole benchmark (with REV's worktree added first and removed at the end)."""
    args = parser().parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(sys.argv[1:] if argv is None else argv)), flush=True)
        return
    datasets = (args.datasets or ("icd10" if args.quick or args.smoke else ",".join(DATASETS))).split(",")
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown:
        sys.exit(f"--datasets: unknown {unknown}; choose from {sorted(DATASETS)}")
    work = smoke_dir("train_speed") if args.smoke else Path(tempfile.mkdtemp(prefix="dstune-bench-train-"))
    rev_tree = work / "baseline-rev"
    rev_sha = checkout_rev(args.baseline_rev, rev_tree) if args.baseline_rev else None
    try:
        run(args, datasets, work, rev_tree, rev_sha)
    finally:
        if rev_sha:
            subprocess.run(["git", "worktree", "remove", "--force", str(rev_tree)], cwd=ROOT, capture_output=True)


def run(args, datasets: list[str], work: Path, rev_tree: Path, rev_sha: str | None) -> None:
    """Build the data, then run the sides in alternation; write the results file after each run."""
    from dstune import api
    from dstune.config import load_recipe

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    model = str(smoke_model(work, args.model)) if args.smoke else None
    repetitions = args.repetitions or (1 if args.smoke else 5 if rev_sha else 3)
    rev_side = f"dstune@{rev_sha[:10]}" if rev_sha else None
    sources = {side: ROOT / "src" for side in ["baseline", *VARIANTS]}
    if rev_side:
        sources[rev_side] = rev_tree / "src"
    if "icd10" in datasets:
        extra = [*smoke_data(work / "smoke-data"), f"model.name_or_path={model}"] if args.smoke else []
        api.data(load_recipe(RECIPE, ["name=icd10", f"output_dir={work}", *extra]))
        (work / "icd10" / "data").rename(work / "data-icd10")
    if "long" in datasets:
        make_long_set(work / "data-long", 400, DATASETS["long"]["dev"])
    peak = gemm_peak_flops(512 if args.smoke else 2048)
    result = {"benchmark": "train_speed", "mode": mode, "machine": machine(),
              "gemm_peak_flops": peak,
              "settings": {"recipe": str(RECIPE.relative_to(ROOT)),
                           "datasets": {d: dataset_spec(d, args.smoke) for d in datasets},
                           "repetitions": repetitions, "dtype": "float32",
                           "baseline": "transformers.Trainer + peft LoRA (r 16, alpha 32, dropout 0.05, q/k/v/o/"
                                       "gate/up/down), DataCollatorForSeq2Seq padding to the longest sample, "
                                       "the model's loss on full-vocabulary logits, default TrainingArguments",
                           "dstune": "dstune.train.train with the demo recipe: packing, fused LoRA, chunked "
                                     "supervised-only LM head", "variants": VARIANTS,
                           "order": "alternating sides in each repetition (A B A B, or A B C A B C with a REV)"},
              "runs": []}
    if args.smoke:
        result["settings"]["model"] = "tiny random Llama (2 layers, hidden 64), SmolLM2 tokenizer"
    if rev_sha:
        result["settings"]["baseline_rev"] = {"rev": args.baseline_rev, "commit": rev_sha, "side": rev_side}
    default_name = f"train_speed-{mode}.json" if mode != "full" else "train_speed.json"
    out_path = Path(args.out) if args.out else (work if args.smoke else ROOT / "bench" / "results") / default_name
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if args.datasets and out_path.exists() and not args.smoke:
        # A subset re-run keeps the other data sets' runs; each data set's ratios come from its own run.
        earlier = json.loads(out_path.read_text())
        for row in earlier["runs"]:
            row.setdefault("gemm_peak_flops", earlier["gemm_peak_flops"])
        result["runs"] = [r for r in earlier["runs"] if r["dataset"] not in datasets]
        result["settings"]["datasets"] = {**earlier["settings"]["datasets"], **result["settings"]["datasets"]}
    for dataset in datasets:
        spec = dataset_spec(dataset, args.smoke)
        steps = args.steps or (spec["steps"] if args.smoke else spec["quick_steps"] if args.quick else spec["steps"])
        dev = spec["dev"] if args.smoke else spec["quick_dev"] if args.quick else spec["dev"]
        sides = ["baseline", "dstune", *([rev_side] if rev_side else [])]
        order = [side for _ in range(repetitions) for side in sides]
        if not (args.quick or args.smoke or args.no_ablations):
            order += [v for v in VARIANTS if v != "dstune"]
        for side in order:
            print(f"bench/train_speed: {dataset} {side} ({steps} steps)", flush=True)
            argv = worker_args(side, dataset, work, steps, dev, args.smoke, model)
            row = run_side(argv, sources[side], in_process=args.smoke and side != rev_side)
            row["gemm_peak_flops"] = peak
            result["runs"].append(row)
            print(f"  {row['supervised_tokens_per_second']:.1f} supervised tok/s, {row['tokens_per_second']:.0f} "
                  f"tok/s, dev loss {row['dev_loss']:.4f}, peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
            result["medians"] = summarise(result["runs"], rev_side)
            if rev_side:
                result["comparison"] = comparison(result["medians"], rev_side)
            out_path.write_text(json.dumps(result, indent=2))  # kept even if a later run fails
        same = {(r["supervised_tokens"], r["tokens"]) for r in result["runs"] if r["dataset"] == dataset}
        if len(same) != 1:
            sys.exit(f"bench/train_speed: the sides saw different tokens on {dataset}: {sorted(same)}")
    print("\n" + tables(result["medians"], rev_side))
    for dataset, ratios in result.get("comparison", {}).items():
        print(f"{dataset}: " + "; ".join(f"{name.replace('_', ' ')}: "
                                         + ", ".join(f"{k} {v:.3f}x" for k, v in r.items())
                                         for name, r in ratios.items()))
    shown = out_path.relative_to(ROOT) if out_path.is_relative_to(ROOT) else out_path
    print(f"bench/train_speed: wrote {shown} (GEMM peak {peak / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
