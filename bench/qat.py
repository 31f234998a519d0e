"""Post-training quantization against quantization-aware training, on the demo, at INT8 and at INT4 (issue 8).

Three trainings of the demo recipe, identical but for `train.qat` (QAT needs `lora.dropout: 0`, so all three train
without LoRA dropout, to keep the comparison fair):
- `ptq`: plain LoRA; the merged model is quantized after training;
- `qat-int8`: `train.qat: {scheme: int8}`, which fake-quantizes the merged weight as torchao's per-row int8 does;
- `qat-int4`: `train.qat: {scheme: int4, group_size: 16}`, as the ONNX int4 export's MatMulNBits blocks do.
Each is merged, scored in fp32 on the test split, then exported and scored at INT8 (torchao int8) and INT4 (ONNX int4)
with the same harness as `dstune export`. Retention is the export's exact match over the same model's fp32 exact
match; the absolute scores and their bootstrap CIs are reported too, since what ships is the quantized score. A
paired bootstrap over the test items compares each QAT model's quantized answers with the PTQ model's at the same
precision (`qat_vs_ptq`: the difference in exact match, its 95% CI and p-value).

    PYTHONPATH=src python bench/qat.py                       # the three trainings (~20 min each on 2 cores)
    PYTHONPATH=src python bench/qat.py --variants ptq        # one of them
    PYTHONPATH=src python bench/qat.py --summary-only        # recompute the paired tests, re-print the table
    PYTHONPATH=src python bench/qat.py --smoke               # a tiny random Llama, ptq and qat-int8, INT8 only

Each variant runs in its own process (a fresh seed state, no model left over), as `dstune run` would.

`--smoke` runs the same code (train, merge, fp32 score, export and score, the paired bootstrap) for `ptq` and
`qat-int8` on a tiny random Llama (the SmolLM2 tokenizer) and a small chat set (common.smoke_data): 2 steps, 8 test
items. It exports INT8 only (torchao), the cheapest real export: the ONNX INT4 export alone takes longer than the
whole smoke should.
It calls each variant in its own process (the same function; a process costs ~6 s of imports here) and writes to a
temporary folder, never to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import smoke_data, smoke_dir, smoke_model  # noqa: E402

VARIANTS = {
    "ptq": [],
    "qat-int8": ["train.qat.scheme=int8"],
    "qat-int4": ["train.qat.scheme=int4", "train.qat.group_size=16"],
}
EXPORTS = {"int8": "torchao:int8", "int4": "onnx:int4-rtn"}  # QAT simulates round-to-nearest int4
OUT = "bench/results/qat.json"
COMMON = ["train.objective=sft", "train.lora.dropout=0", "eval.general.enabled=false", "export.formats=[]", "export.min_retention=0.01"]
# --smoke: the variants and exports it runs, and its recipe overrides (besides the model and the output folder).
SMOKE_VARIANTS = ["ptq", "qat-int8"]
SMOKE_EXPORTS = {"int8": EXPORTS["int8"]}
# Exact match alone: the demo's ICD-10 metric and check load the ICD-10-CM tables (3 s).
SMOKE = ["train.max_steps=2", "train.batch_size=4", "train.eval_steps=0", "eval.metrics=[exact_match]",
         "eval.checks=[]", "eval.bootstrap_samples=100", "eval.cache=false"]


def run_variant(recipe_path: str, variant: str, extra: list[str] = (), exports: dict = EXPORTS) -> dict:
    """Train, merge, score fp32 and each export of one variant; the row of the results file."""
    from dstune import api
    from dstune.config import load_recipe
    from dstune.export.artifacts import export_and_score

    name = load_recipe(recipe_path, list(extra)).name
    recipe = load_recipe(recipe_path, [*COMMON, *extra, *VARIANTS[variant], f"name={name}-{variant}"])
    start = time.perf_counter()
    trained = api.train(recipe)
    train_seconds = time.perf_counter() - start
    del trained
    merged = api.merge(recipe)
    reference = api.merged_reference(recipe, merged)
    row = {"overrides": [*COMMON, *VARIANTS[variant]], "run_dir": str(recipe.run_dir),
           "train_seconds": round(train_seconds, 1), "metric": recipe.eval.metrics[0],
           "fp32_score": reference["metrics"][recipe.eval.metrics[0]],
           "fp32_ci": reference.get("ci", {}).get(recipe.eval.metrics[0]), "exports": {}}
    for bits, spec in exports.items():
        record = export_and_score(recipe, spec, merged, reference)
        row["exports"][bits] = {key: record[key] for key in ("format", "quant", "score", "ci", "retention",
                                                              "answer_agreement", "completion_rate", "size_ratio")}
    return row


def variant_row(recipe_path: str, variant: str) -> dict:
    """One variant's row, from a child process (its other output passes through)."""
    rows = []
    with subprocess.Popen([sys.executable, __file__, "--recipe", recipe_path, "--one", variant],
                          stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            rows.append(line) if line.startswith("DSTUNE_ROW ") else print(line, end="", flush=True)
    if proc.returncode or not rows:
        sys.exit(f"bench: variant {variant} failed (exit {proc.returncode})")
    return json.loads(rows[-1].removeprefix("DSTUNE_ROW "))


def compare_to_ptq(result: dict) -> dict:
    """Paired bootstrap, per precision: the QAT model's quantized exact match against the PTQ model's."""
    from dstune.evaluate.metrics import METRICS
    from dstune.evaluate.stats import paired_bootstrap

    rows, out = result["variants"], {}
    for bits, spec in result["exports"].items():
        if "ptq" not in rows or f"qat-{bits}" not in rows:
            continue
        name = spec.replace(":", "-")
        ptq, qat = (json.loads((Path(rows[v]["run_dir"]) / "eval" / f"export-{name}.json").read_text())["predictions"]
                    for v in ("ptq", f"qat-{bits}"))
        assert [p["id"] for p in ptq] == [p["id"] for p in qat], "the runs scored different test items"
        metric = rows["ptq"]["metric"]
        out[bits] = {"export": spec, "metric": metric,
                     **paired_bootstrap(METRICS[metric], [p["got"] for p in ptq], [p["got"] for p in qat],
                                        [p["expected"] for p in ptq])}
    return out


def table(result: dict) -> str:
    rows = result["variants"]
    lines = ["| training | fp32 exact match [95% CI] | INT8 (torchao) exact match | INT8 retention | "
             "INT4 (ONNX) exact match | INT4 retention |", "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        cells = [f"{row['fp32_score']:.4f} [{row['fp32_ci']['low']:.3f}, {row['fp32_ci']['high']:.3f}]"]
        for bits in EXPORTS:
            e = row["exports"].get(bits)
            if e is None:  # not exported in this run (--smoke: INT8 only)
                cells += ["-", "-"]
                continue
            cells += [f"{e['score']:.4f} [{e['ci']['low']:.3f}, {e['ci']['high']:.3f}] (agrees {e['answer_agreement']:.3f})",
                      f"{e['retention']:.4f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for bits, c in result.get("qat_vs_ptq", {}).items():
        lines.append(f"\n{bits} ({c['export']}): QAT {c['b']:.4f} vs PTQ {c['a']:.4f}, difference {c['diff']:+.4f} "
                     f"[{c['low']:+.4f}, {c['high']:+.4f}], p={c['p_value']:.3f}"
                     f"{' (significant)' if c['significant'] else ' (not significant)'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/icd10_lora.yaml")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="ptq and qat-int8 on a tiny random Llama, INT8 only; results to a temp folder")
    parser.add_argument("--model", help="--smoke: a tiny model folder built already (default: build one)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one variant, its row on stdout
    args = parser.parse_args()
    if args.one:
        print("DSTUNE_ROW " + json.dumps(run_variant(args.recipe, args.one)), flush=True)
        return
    extra, exports, variants = [], EXPORTS, args.variants
    if args.smoke:
        work = smoke_dir("qat")
        extra = [*smoke_data(work / "smoke-data"), *SMOKE, f"model.name_or_path={smoke_model(work, args.model)}",
                 f"output_dir={work}"]
        exports, variants = SMOKE_EXPORTS, ",".join(SMOKE_VARIANTS)
        if args.out == OUT:
            args.out = str(work / "qat-smoke.json")
    out = Path(args.out)
    if args.summary_only:
        result = json.loads(out.read_text())
        result["qat_vs_ptq"] = compare_to_ptq(result)
        out.write_text(json.dumps(result, indent=2))
        print(table(result))
        return
    from common import machine

    result = json.loads(out.read_text()) if out.is_file() else {"benchmark": "qat", "variants": {}}
    result.update(machine=machine(), recipe=args.recipe, exports=exports, common_overrides=COMMON)
    if args.smoke:
        result.update(mode="smoke", smoke_overrides=SMOKE,
                      model="tiny random Llama (2 layers, hidden 64), SmolLM2 tokenizer")
    for variant in variants.split(","):
        if variant not in VARIANTS:
            sys.exit(f"bench: unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
        result["variants"][variant] = (json.loads(json.dumps(run_variant(args.recipe, variant, extra, exports)))
                                       if args.smoke else variant_row(args.recipe, variant))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))  # after each variant: a crash keeps the finished ones
        print(f"bench: {variant} done", flush=True)
    result["qat_vs_ptq"] = compare_to_ptq(result)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
