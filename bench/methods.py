"""Compare PEFT methods on the ICD-10 demo data: same base, data, steps and seed, in one run.

Each method trains in its own process (so peak RSS is its own), for the same number of optimizer steps, then
scores exact match on the dev split. LoRA is the baseline the ratios are taken against.

    .venv/bin/python bench/methods.py            # full: 60 steps, 148 dev samples (~20 min on 2 cores)
    .venv/bin/python bench/methods.py --quick    # 3 steps, 16 dev samples (< 3 min)
    .venv/bin/python bench/methods.py --smoke    # every method on a tiny random Llama, 2 steps (seconds)

Writes bench/results/methods.json (or methods-quick.json; `--out` elsewhere) and prints the markdown table of
docs/methods.md. `--smoke` runs every method through the same worker on a tiny random Llama (the SmolLM2
tokenizer) and a small chat set (common.smoke_data), and writes to a temporary folder, never to bench/results/. It
calls the worker in its own process (the same function, with the same arguments): five processes would cost ~6 s
of imports each here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import gemm_peak_flops, machine, peak_rss_mb, smoke_data, smoke_dir, smoke_model

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "icd10_lora.yaml"

# Each method at its usual learning rate; everything else comes from the demo recipe.
METHODS: dict[str, list[str]] = {
    "lora": ["train.method=lora"],
    "dora": ["train.method=dora"],
    "prefix": ["train.method=prefix", "train.learning_rate=1e-2"],
    "bottleneck": ["train.method=bottleneck"],
    "ia3": ["train.method=ia3", "train.learning_rate=1e-2"],
}


def common_overrides(work: Path, steps: int, dev: int, model: str | None = None) -> list[str]:
    smoke = [f"model.name_or_path={model}", "train.batch_size=4"] if model else []
    return [f"output_dir={work}", f"train.max_steps={steps}", "train.eval_steps=0", "train.logging_steps=1",
            "train.objective=sft",
            f"train.max_dev_samples={dev}", *smoke]


def worker(method: str, work: Path, data_dir: Path, steps: int, dev: int, model: str | None = None) -> dict:
    """Train one method and score the dev split; runs in its own process."""
    from dstune.config import load_recipe
    from dstune.data.build import load_split
    from dstune.data.templates import get_template
    from dstune.evaluate.harness import evaluate_records
    from dstune.models.loading import load_tokenizer, resolve_model_path
    from dstune.train import train

    recipe = load_recipe(RECIPE, [f"name=bench_{method}", *common_overrides(work, steps, dev, model),
                                  *METHODS[method]])
    result = train(recipe, data_dir)
    summary = result.summary
    tokenizer = load_tokenizer(resolve_model_path(recipe.model.name_or_path), recipe.model.trust_remote_code)
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
        "peak_rss_mb": peak_rss_mb(),
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


def run_method(method: str, work: Path, steps: int, dev: int, model: str | None, in_process: bool) -> dict:
    """One method's row: the worker in a child process (or, for --smoke, in this one)."""
    argv = ["--worker", method, "--work", str(work), "--steps", str(steps), "--dev", str(dev)]
    argv += ["--model", model] if model else []
    if in_process:
        return json.loads(json.dumps(run_worker(argv)))  # the child's JSON round trip
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"bench/methods: {method} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run_worker(argv: list[str]) -> dict:
    """The worker of a parsed command line (the child process's entry, and --smoke's in-process call)."""
    args = parser().parse_args(argv)
    work = Path(args.work)
    return worker(args.worker, work, work / "shared" / "data", args.steps, args.dev, args.model)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 steps and 16 dev samples (< 3 min)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny random Llama, a small chat set, 2 steps, 4 dev samples; results to a temp folder")
    parser.add_argument("--model", help="--smoke: a tiny model folder built already (default: build one)")
    parser.add_argument("--out", help="the results file (default bench/results/methods[-quick].json)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--steps", type=int, help="optimizer steps per method (default 60, quick 3)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--dev", type=int, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = parser().parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_worker(sys.argv[1:])), flush=True)
        return
    steps = args.steps or (2 if args.smoke else 3 if args.quick else 60)
    dev = args.dev or (4 if args.smoke else 16 if args.quick else 148)

    from dstune import api
    from dstune.config import load_recipe

    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"--methods: unknown {unknown}; choose from {sorted(METHODS)}")
    if "lora" not in methods:
        methods.insert(0, "lora")  # the baseline
    work = smoke_dir("methods") if args.smoke else Path(tempfile.mkdtemp(prefix="dstune-bench-methods-"))
    model = str(smoke_model(work, args.model)) if args.smoke else None
    data = smoke_data(work / "smoke-data") if args.smoke else []
    api.data(load_recipe(RECIPE, ["name=shared", *common_overrides(work, steps, dev, model), *data]))
    base_recipe = load_recipe(RECIPE, common_overrides(work, steps, dev, model))
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    result = {
        "benchmark": "methods",
        "mode": mode,
        "machine": machine(),
        "gemm_peak_flops": gemm_peak_flops(512 if args.smoke else 2048),
        "settings": {"recipe": str(RECIPE.relative_to(ROOT)), "steps": steps, "dev_samples": dev,
                     "seed": base_recipe.train.seed, "batch_size": base_recipe.train.batch_size,
                     "baseline": "lora (the demo recipe's LoRA: r 16, alpha 32, dropout 0.05, all dense linears)",
                     "per_method": METHODS, "dtype": "float32"},
        "runs": [],
    }
    rows = result["runs"]
    if args.smoke:
        result["settings"]["model"] = "tiny random Llama (2 layers, hidden 64), SmolLM2 tokenizer"
    name = "methods.json" if mode == "full" else f"methods-{mode}.json"
    out_path = Path(args.out) if args.out else (work if args.smoke else ROOT / "bench" / "results") / name
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for method in methods:
        print(f"bench/methods: {method} ({steps} steps)", flush=True)
        row = run_method(method, work, steps, dev, model, in_process=args.smoke)
        # Forward 2N + backward (activation gradients) 2N FLOPs per token through the frozen base.
        flops = 4 * row["total_parameters"] * row["tokens_per_second"]
        row["approx_gemm_fraction"] = flops / result["gemm_peak_flops"]
        rows.append(row)
        out_path.write_text(json.dumps(result, indent=2))  # each method's row is kept even if a later one fails
        print(f"  {row['tokens_per_second']:.0f} tokens/s, dev EM {row['dev_exact_match']:.3f}, "
              f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    print("\n" + table(rows) + "\n")
    print(f"bench/methods: wrote {out_path.relative_to(ROOT) if out_path.is_relative_to(ROOT) else out_path}")


if __name__ == "__main__":
    main()
