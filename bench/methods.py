"""Compare PEFT methods on the ICD-10 demo data: same base, data, steps and seed, in one run.

Each method trains in its own process (so peak RSS is its own), for the same number of optimizer steps, then
scores exact match on the dev split. LoRA is the baseline the ratios are taken against.

    .venv/bin/python bench/methods.py            # full: 60 steps, 148 dev samples (~20 min on 2 cores)
    .venv/bin/python bench/methods.py --quick    # 3 steps, 16 dev samples (< 3 min)

Writes bench/results/methods.json (or methods-quick.json) and prints the markdown table of docs/methods.md.
"""

from __future__ import annotations

import argparse
import json
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

# Each method at its usual learning rate; everything else comes from the demo recipe.
METHODS: dict[str, list[str]] = {
    "lora": ["train.method=lora"],
    "dora": ["train.method=dora"],
    "prefix": ["train.method=prefix", "train.learning_rate=1e-2"],
    "adapter": ["train.method=adapter"],
    "ia3": ["train.method=ia3", "train.learning_rate=1e-2"],
}


def common_overrides(work: Path, steps: int, dev: int) -> list[str]:
    return [f"output_dir={work}", f"train.max_steps={steps}", "train.eval_steps=0", "train.logging_steps=1",
            f"train.max_dev_samples={dev}"]


def worker(method: str, work: Path, data_dir: Path, steps: int, dev: int) -> dict:
    """Train one method and score the dev split; runs in its own process."""
    from dstune.config import load_recipe
    from dstune.data.build import load_split
    from dstune.data.templates import get_template
    from dstune.evaluate.harness import evaluate_records
    from dstune.train.trainer import train

    recipe = load_recipe(RECIPE, [f"name=bench_{method}", *common_overrides(work, steps, dev), *METHODS[method]])
    result = train(recipe, data_dir)
    summary = result.summary
    tokenizer = result.trainer.processing_class
    template = get_template(recipe.model.template, tokenizer)
    records = load_split(data_dir, "dev")[:dev]
    start = time.perf_counter()
    scores = evaluate_records(result.model, tokenizer, template, records, ["exact_match"], recipe.eval.batch_size,
                              recipe.eval.max_new_tokens)
    losses = [e["loss"] for e in summary["log_history"] if "loss" in e]
    steps_timed = summary["step_seconds"][2:] or summary["step_seconds"]  # the first steps warm up allocators
    return {
        "method": method,
        "overrides": METHODS[method],
        "learning_rate": summary["learning_rate"],
        "trainable_parameters": summary["trainable_parameters"],
        "total_parameters": summary["total_parameters"],
        "trainable_percent": summary["trainable_percent"],
        "optimizer_steps": summary["optimizer_steps"],
        "tokens": summary["tokens"],
        "train_seconds": sum(summary["step_seconds"]),
        "tokens_per_second": summary["tokens"] / sum(summary["step_seconds"]),
        "step_seconds": summary["step_seconds"],
        "median_step_seconds": statistics.median(steps_timed),
        "final_train_loss": statistics.mean(losses[-5:]) if losses else None,
        "dev_exact_match": scores["metrics"]["exact_match"],
        "dev_samples": len(records),
        "dev_eval_seconds": time.perf_counter() - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def table(rows: list[dict]) -> str:
    """The markdown table of docs/methods.md."""
    lines = ["| method | trainable params | % of base | tokens/s | vs LoRA | % of GEMM peak | peak RSS (MB) "
             "| final train loss | dev exact match |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = next(r for r in rows if r["method"] == "lora")
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable_parameters']:,} | {r['trainable_percent']:.3f} | "
                     f"{r['tokens_per_second']:.0f} | {r['tokens_per_second'] / base['tokens_per_second']:.2f} | "
                     f"{100 * r['approx_gemm_fraction']:.1f} | {r['peak_rss_mb']:.0f} | {r['final_train_loss']:.3f} | "
                     f"{r['dev_exact_match']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 steps and 16 dev samples (< 3 min)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--steps", type=int, help="optimizer steps per method (default 60, quick 3)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--dev", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 60)
    dev = args.dev or (16 if args.quick else 148)
    if args.worker:
        work = Path(args.work)
        print("RESULT " + json.dumps(worker(args.worker, work, work / "shared" / "data", steps, dev)), flush=True)
        return

    from dstune import api
    from dstune.config import load_recipe

    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"--methods: unknown {unknown}; choose from {sorted(METHODS)}")
    if "lora" not in methods:
        methods.insert(0, "lora")  # the baseline
    work = Path(tempfile.mkdtemp(prefix="dstune-bench-methods-"))
    api.data(load_recipe(RECIPE, ["name=shared", *common_overrides(work, steps, dev)]))
    base_recipe = load_recipe(RECIPE)
    result = {
        "benchmark": "methods",
        "mode": "quick" if args.quick else "full",
        "machine": machine(),
        "gemm_peak_flops": gemm_peak_flops(),
        "settings": {"recipe": str(RECIPE.relative_to(ROOT)), "steps": steps, "dev_samples": dev,
                     "seed": base_recipe.train.seed, "batch_size": base_recipe.train.batch_size,
                     "baseline": "lora (the demo recipe's LoRA: r 16, alpha 32, dropout 0.05, all dense linears)",
                     "per_method": METHODS, "dtype": "float32"},
        "runs": [],
    }
    rows = result["runs"]
    out_path = ROOT / "bench" / "results" / ("methods-quick.json" if args.quick else "methods.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for method in methods:
        print(f"bench/methods: {method} ({steps} steps)", flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--worker", method, "--work", str(work), "--steps", str(steps),
             "--dev", str(dev)], capture_output=True, text=True, cwd=ROOT,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"bench/methods: {method} failed:\n{out.stderr[-3000:]}")
        row = json.loads(lines[-1][len("RESULT "):])
        # Forward 2N + backward (activation gradients) 2N FLOPs per token through the frozen base.
        flops = 4 * row["total_parameters"] * row["tokens_per_second"]
        row["approx_gemm_fraction"] = flops / result["gemm_peak_flops"]
        rows.append(row)
        out_path.write_text(json.dumps(result, indent=2))  # each method's row is kept even if a later one fails
        print(f"  {row['tokens_per_second']:.0f} tokens/s, dev EM {row['dev_exact_match']:.3f}, "
              f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    print("\n" + table(rows) + "\n")
    print(f"bench/methods: wrote {out_path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
