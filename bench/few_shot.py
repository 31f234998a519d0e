"""Few-shot on the demo: does fine-tuning at 1, 2, 4 examples per category beat prompting with 5 examples?

Runs `dstune curve` (dstune.curve.run_curve) on the demo recipe: LoRA, Prefix-Tuning and IA3 trained on 1, 2, 4
and all training records per ICD-10-CM category (145 categories), each scored on the same 300 test records;
beside them, at each size, the base model with 5 demonstrations drawn from the same records (random, and the 5
most similar by TF-IDF), and a TF-IDF 1-nearest-neighbour classifier with no language model. Every figure comes
from this one run: test exact match with a bootstrap 95% CI, and paired bootstrap tests at each size.

    .venv/bin/python bench/few_shot.py                      # the demo, sizes 1,2,4,all (hours on 2 cores)
    .venv/bin/python bench/few_shot.py --sizes 1,2,4        # without the full-data runs
    .venv/bin/python bench/few_shot.py --smoke              # a tiny random Llama, sizes 2,4 in total (seconds)

Writes bench/results/few_shot.json (`--out` elsewhere; --smoke writes to a temporary folder) with the goals of
docs/few_shot.md stated as met or not.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import machine, smoke_data, smoke_dir, smoke_model

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "icd10_lora.yaml"


def goals(report: dict) -> dict:
    """The goals of the issue, each stated as met or not, with the numbers behind it."""
    crossover = report["crossover"]
    lora = crossover.get("lora") or {}
    small = [s for s in report["sizes"] if s is not None and s <= 4]
    at = lora.get("significant_at")
    rows = report["rows"]
    shot_tokens = [r["prompt_tokens_mean"] for r in rows if r["kind"] == "in-context" and r["prompt_tokens_mean"]]
    lora_tokens = [r["prompt_tokens_mean"] for r in rows if r["system"] == "lora" and r["prompt_tokens_mean"]]
    return {
        "crossover_found": {"met": any(c["found"] for c in crossover.values()),
                            "per_method": {m: c["significant_at"] for m, c in crossover.items()}},
        "lora_at_most_4_per_category_beats_in_context_and_1nn": {
            "met": bool(lora.get("found")) and at is not None and at in small, "lora_significant_at": at,
            "prompt_length_ratio": (round(sum(lora_tokens) / len(lora_tokens) / (sum(shot_tokens) / len(shot_tokens)), 3)
                                    if lora_tokens and shot_tokens else None)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama and a small set, in seconds")
    parser.add_argument("--model", help="--smoke: a tiny model folder built already (default: build one)")
    parser.add_argument("--sizes", help="default 1,2,4,all per category (--smoke: 2,4 in total)")
    parser.add_argument("--methods", default="lora,prefix,ia3")
    parser.add_argument("--min-steps", type=int, help="train.min_steps of every run (default 30; --smoke: 2)")
    parser.add_argument("--shots", default="random,similar", help="in-context baselines: random,similar or none")
    parser.add_argument("--out", help="results file (default bench/results/few_shot.json)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT / "src"))
    from dstune.config import load_recipe
    from dstune.curve import parse_methods, parse_sizes, run_curve

    work = smoke_dir("few-shot") if args.smoke else Path(tempfile.mkdtemp(prefix="dstune-bench-few-shot-"))
    # Fresh answers only: an answer from the generation cache has no time per answer.
    overrides = [f"output_dir={work}", "name=few_shot", "eval.cache=false", "train.objective=sft"]
    if args.smoke:
        overrides += [f"model.name_or_path={smoke_model(work, args.model)}", *smoke_data(work / "smoke-data"),
                      "train.batch_size=4", "train.max_dev_samples=4", "train.eval_steps=2", "eval.bootstrap_samples=50",
                      "export.formats=[]"]
    recipe = load_recipe(RECIPE, overrides)
    sizes = parse_sizes(args.sizes or ("2,4" if args.smoke else "1,2,4,all"))
    methods = parse_methods(args.methods)
    k = 2 if args.smoke else 5
    start = time.perf_counter()
    shots = () if args.shots == "none" else tuple(s for s in args.shots.split(",") if s)
    min_steps = args.min_steps if args.min_steps is not None else 2 if args.smoke else 30
    report = run_curve(recipe, sizes, methods, per="total" if args.smoke else "stratum", shots=shots,
                       min_steps=min_steps, k=k)
    result = {"benchmark": "few_shot", "mode": "smoke" if args.smoke else "full", "machine": machine(),
              "settings": {"recipe": str(RECIPE.relative_to(ROOT)), "overrides": overrides[2:] if not args.smoke else "smoke",
                           "sizes": sizes, "methods": methods, "k": k, "per_stratum": report["per_stratum"],
                           "min_steps": report["min_steps"]},
              "seconds": round(time.perf_counter() - start, 1), "curve": report, "goals": goals(report)}
    out = Path(args.out) if args.out else (work if args.smoke else ROOT / "bench" / "results") / "few_shot.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    from dstune.curve import curve_table

    print(curve_table(report))
    print(json.dumps(result["goals"], indent=2))
    print(f"bench/few_shot: wrote {out}")


if __name__ == "__main__":
    main()
