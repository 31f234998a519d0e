"""Forgetting across a task sequence: ICD-10 chapter E, then I, then J, for each control against forgetting.

Each control trains the three stages in order (a stage starts from the one before), and after each stage scores
every chapter seen so far (exact match on its test split) and tier 1 (general contains_answer and perplexity on the
held-out general data, retention against the base model). Everything else comes from recipes/icd10_continual.yaml.

    .venv/bin/python bench/continual.py                 # full: 60 steps per stage
    .venv/bin/python bench/continual.py --quick         # 20 steps per stage, 32 test records per chapter
    .venv/bin/python bench/continual.py --smoke         # a tiny random Llama and three small chat tasks (seconds)
    .venv/bin/python bench/continual.py --quick --controls rehearsal --out part2.json
    .venv/bin/python bench/continual.py --merge part1.json part2.json --out bench/results/continual-quick.json

The controls (CONTROLS): naive sequential tuning, replay of the general set, the KL anchor, O-LoRA, EWC, KL + replay,
rehearsal of the earlier chapters' records, and KL + rehearsal. --quick is not a 3-minute run (BENCHMARKS.md rule 7):
each stage trains and scores SmolLM2, about 2 min on 2 cores (5 with the KL anchor's top-k pass), so all eight
controls take about 70 min; --controls runs a subset, and --merge joins runs made apart with the same settings and
the same base scores (the base is scored deterministically, so a mismatch means different code or data).

Reported per control (BENCHMARKS.md: ratios within one run, here against `naive`): the accuracy matrix R[i][j]
(chapter j after stage i), the final average accuracy over the chapters, backward transfer
BWT = mean_j<T (R[T][j] - R[j][j]), forward transfer FWT = mean_j>1 (R[j-1][j] - base_j), general retention of both
tier-1 measures after the last stage, trainable parameters and training seconds. Accuracies carry bootstrap 95%
CIs (dstune.evaluate.stats). Writes bench/results/continual.json (or continual-quick.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import machine, smoke_data, smoke_dir, smoke_model

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "icd10_continual.yaml"
TASKS = {"E": "4", "I": "9", "J": "10"}

# Each control's overrides; "previous" is filled per stage with the adapter of the stage before.
CONTROLS: dict[str, list[str]] = {
    "naive": [],
    "replay": ["data.replay.ratio=0.2"],  # general records and the earlier chapters' training records
    "kl": ["train.continual.kl.weight=1.0"],
    "olora": [],
    "ewc": ["train.continual.ewc.weight=1000.0"],
    "kl+replay": ["train.continual.kl.weight=1.0", "data.replay.ratio=0.2"],
    # Rehearsal: only the earlier chapters' training records, REHEARSAL_RATIO x this stage's own.
    "rehearsal": [],
    "kl+rehearsal": ["train.continual.kl.weight=1.0"],
}
REHEARSAL_RATIO = 0.5


def stage_overrides(control: str, task: str, chapter: str, previous: Path | None, replay_dir: Path | None,
                    work: Path, steps: int, smoke: list[str]) -> list[str]:
    out = [f"name={control.replace('+', '_')}_{task}", f"output_dir={work / 'runs'}", f"train.max_steps={steps}",
           "train.eval_steps=0", "train.logging_steps=5", *smoke, *CONTROLS[control]]
    out += [f"data.icd10.chapters=[{chapter}]"] if not smoke else []
    if previous is not None:
        out.append(f"train.continual.orthogonal.previous={previous}" if control == "olora"
                   else f"train.init_adapter={previous}")
    if replay_dir is not None:
        out.append(f"data.replay.file={replay_dir}")
        if "rehearsal" in control:  # from the second stage on (the first is the recipe's, as naive's)
            out.append(f"data.replay.ratio={REHEARSAL_RATIO}")
    return out


def replay_pool(work: Path, control: str, earlier: list[Path]) -> Path | None:
    """The replay folder of a replaying control: earlier stages' train data, and for `replay` the general set."""
    from dstune.data.build import GENERAL_SET

    if "replay" not in control and "rehearsal" not in control:
        return None
    folder = work / "replay" / f"{control.replace('+', '_')}_{len(earlier)}"
    folder.mkdir(parents=True, exist_ok=True)
    if "replay" in control:  # the shipped general replay set (never tier 1's held-out part)
        shutil.copy(GENERAL_SET, folder / "general.jsonl")
    for i, data_dir in enumerate(earlier):
        lines = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines() if line.strip()]
        # Earlier records as plain chat records (their meta belonged to their own run).
        (folder / f"stage{i + 1}.jsonl").write_text("".join(
            json.dumps({"id": f"stage{i + 1}-{r['id']}", "messages": r["messages"]}) + "\n"
            for r in lines if "messages" in r and not r["meta"].get("replay")))
    return folder


def score(model, tokenizer, template, records, batch_size: int, max_new_tokens: int) -> dict:
    from dstune.evaluate.harness import evaluate_records
    from dstune.evaluate.stats import bootstrap_ci
    from dstune.plugins import METRICS

    result = evaluate_records(model, tokenizer, template, records, ["exact_match"], batch_size, max_new_tokens)
    got = [p["got"] for p in result["predictions"]]
    expected = [p["expected"] for p in result["predictions"]]
    ci = bootstrap_ci(METRICS["exact_match"], got, expected)
    return {"exact_match": ci["value"], "ci": [ci["low"], ci["high"]], "samples": len(got)}


def general(model, tokenizer, template, recipe) -> dict:
    from dstune.evaluate.general import general_eval

    out = general_eval(model, tokenizer, template, recipe.eval.general, recipe.eval.batch_size)
    return {"accuracy": out["accuracy"], "perplexity": out["perplexity"]}


def run_control(control: str, work: Path, steps: int, tests: dict[str, list[dict]], smoke: dict[str, list[str]],
                base: dict) -> dict:
    """Train the three stages of one control, scoring every chapter seen so far and tier 1 after each."""
    from dstune import api
    from dstune.config import load_recipe
    from dstune.data.templates import get_template
    from dstune.models.loading import load_tokenizer, resolve_model_path

    previous, earlier, matrix, stages = None, [], [], []
    tasks = list(TASKS)
    for s, task in enumerate(tasks):
        replay_dir = replay_pool(work, control, earlier) if earlier else None
        overrides = stage_overrides(control, task, TASKS[task], previous, replay_dir, work, steps, smoke.get(task, []))
        recipe = load_recipe(RECIPE, overrides)
        data_dir = api.data(recipe)
        start = time.perf_counter()
        result = api.train(recipe)
        seconds = time.perf_counter() - start
        tokenizer = load_tokenizer(resolve_model_path(recipe.model.name_or_path))
        template = get_template(recipe.model.template, tokenizer)
        model = result.model.eval()
        row = [score(model, tokenizer, template, tests[t], recipe.eval.batch_size, recipe.eval.max_new_tokens)
               for t in tasks]  # every chapter: seen ones for BWT, the next for FWT
        matrix.append(row)
        tier1 = general(model, tokenizer, template, recipe)
        stages.append({"task": task, "train_seconds": round(seconds, 1),
                       "trainable_parameters": result.summary["trainable_parameters"],
                       "objective_summary": result.summary.get("objective_summary"), "general": tier1,
                       "general_retention": {"accuracy": tier1["accuracy"] / base["general"]["accuracy"]
                                             if base["general"]["accuracy"] else None,
                                             "perplexity": base["general"]["perplexity"] / tier1["perplexity"]}})
        print(f"  {control} after {task}: " + ", ".join(f"{t} {c['exact_match']:.3f}" for t, c in zip(tasks, row))
              + f"; general acc {tier1['accuracy']:.3f}, ppl {tier1['perplexity']:.2f}", flush=True)
        previous, earlier = result.adapter_dir, earlier + [data_dir]
        del model, result
    return {"control": control, "overrides": CONTROLS[control], "matrix": matrix, "stages": stages,
            **summarise(matrix, base, stages)}


def summarise(matrix: list[list[dict]], base: dict, stages: list[dict]) -> dict:
    """Final average accuracy, BWT and FWT (in points), and the last stage's general retention."""
    T = len(matrix)
    acc = [[c["exact_match"] for c in row] for row in matrix]
    final = sum(acc[-1]) / T
    bwt = sum(acc[-1][j] - acc[j][j] for j in range(T - 1)) / (T - 1)
    fwt = sum(acc[j - 1][j] - base["tasks"][j]["exact_match"] for j in range(1, T)) / (T - 1)
    return {"final_average": round(100 * final, 2), "bwt_points": round(100 * bwt, 2),
            "fwt_points": round(100 * fwt, 2), "general_retention": stages[-1]["general_retention"],
            "train_seconds": round(sum(s["train_seconds"] for s in stages), 1),
            "trainable_parameters": stages[-1]["trainable_parameters"]}


def table(rows: list[dict]) -> str:
    lines = ["| control | final avg EM | BWT (points) | FWT (points) | general acc retention | perplexity retention "
             "| trainable params | train s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["general_retention"]
        acc = "n/a (base 0)" if g["accuracy"] is None else f"{g['accuracy']:.3f}"
        lines.append(f"| {r['control']} | {r['final_average']:.1f} | {r['bwt_points']:+.1f} | {r['fwt_points']:+.1f} "
                     f"| {acc} | {g['perplexity']:.3f} | {r['trainable_parameters']:,} "
                     f"| {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 steps per stage, 32 test records per chapter")
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama, small chat tasks, 2 steps")
    parser.add_argument("--model", help="--smoke: a tiny model folder built already (default: build one)")
    parser.add_argument("--out", help="the results file (default bench/results/continual[-quick].json)")
    parser.add_argument("--controls", default=",".join(CONTROLS), help="comma-separated subset of "
                        + ",".join(CONTROLS))
    parser.add_argument("--steps", type=int, help="optimizer steps per stage (default 60, quick 20, smoke 2)")
    parser.add_argument("--merge", nargs="+", metavar="RESULTS",
                        help="join results files of separate runs (same settings and base scores) into --out")
    return parser


def merge(paths: list[str], out: Path) -> dict:
    """One results file from runs made apart: their settings and base scores must agree, each control once."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    result = {**first, "runs": [], "merged_from": []}
    for path, part in zip(paths, parts):
        shared = part["settings"].keys() & first["settings"].keys()  # a newer run may record more settings
        if part["mode"] != first["mode"] or any(part["settings"][k] != first["settings"][k] for k in shared):
            sys.exit(f"--merge: {path} has other settings than {paths[0]}")
        if part["base"] != first["base"]:
            sys.exit(f"--merge: {path} scored the base model differently from {paths[0]}")
        for run in part["runs"]:
            if any(r["control"] == run["control"] for r in result["runs"]):
                sys.exit(f"--merge: control {run['control']!r} is in more than one file")
            result["runs"].append(run)
        result["settings"] = {**part["settings"], **result["settings"]}
        result["merged_from"].append({"file": Path(path).name, "controls": [r["control"] for r in part["runs"]],
                                      "machine": part["machine"]})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    args = parser().parse_args()
    if args.merge:
        if not args.out:
            sys.exit("--merge needs --out")
        print(table(merge(args.merge, Path(args.out))["runs"]) + f"\n\nbench/continual: wrote {args.out}")
        return
    controls = args.controls.split(",")
    unknown = sorted(set(controls) - set(CONTROLS))
    if unknown:
        sys.exit(f"--controls: unknown {unknown}; choose from {sorted(CONTROLS)}")
    steps = args.steps or (2 if args.smoke else 20 if args.quick else 60)
    per_task = 4 if args.smoke else 32 if args.quick else None
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"

    from dstune import api
    from dstune.config import load_recipe
    from dstune.data.build import load_split
    from dstune.data.templates import get_template
    from dstune.models.loading import load_model, load_tokenizer, resolve_model_path

    work = smoke_dir("continual") if args.smoke else Path(tempfile.mkdtemp(prefix="dstune-bench-continual-"))
    smoke: dict[str, list[str]] = {}
    if args.smoke:
        model_dir = smoke_model(work, args.model)
        for task in TASKS:  # three small tasks: the smoke set, each with its own folder
            data = smoke_data(work / f"data-{task}")
            smoke[task] = [f"model.name_or_path={model_dir}", "train.batch_size=4", "train.continual.ewc.samples=4",
                           f"train.continual.kl.file={work / f'data-{task}' / 'dev.jsonl'}",
                           "train.continual.kl.text_file=", "eval.general.max_samples=8", "eval.batch_size=8", *data]
    tests = {}
    for task, chapter in TASKS.items():
        recipe = load_recipe(RECIPE, [f"name=tasks_{task}", f"output_dir={work / 'runs'}",
                                      *([f"data.icd10.chapters=[{chapter}]"] if not args.smoke else []),
                                      *smoke.get(task, [])])
        tests[task] = [r for r in load_split(api.data(recipe), "test") if "messages" in r][:per_task]
    recipe = load_recipe(RECIPE, [f"output_dir={work / 'runs'}", *smoke.get("E", [])])
    model_path = resolve_model_path(recipe.model.name_or_path)
    tokenizer = load_tokenizer(model_path)
    template = get_template(recipe.model.template, tokenizer)
    base_model = load_model(model_path, "float32").eval()
    base = {"tasks": [score(base_model, tokenizer, template, tests[t], recipe.eval.batch_size,
                            recipe.eval.max_new_tokens) for t in TASKS],
            "general": general(base_model, tokenizer, template, recipe)}
    del base_model
    result = {"benchmark": "continual", "mode": mode, "machine": machine(),
              "settings": {"recipe": str(RECIPE.relative_to(ROOT)), "tasks": TASKS, "steps_per_stage": steps,
                           "test_records_per_task": {t: len(r) for t, r in tests.items()}, "baseline": "naive",
                           "rehearsal_ratio": REHEARSAL_RATIO},
              "base": base, "runs": []}
    name = "continual.json" if mode == "full" else f"continual-{mode}.json"
    out_path = Path(args.out) if args.out else (work if args.smoke else ROOT / "bench" / "results") / name
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for control in controls:
        print(f"bench/continual: {control} ({steps} steps per stage)", flush=True)
        result["runs"].append(run_control(control, work, steps, tests, smoke, base))
        out_path.write_text(json.dumps(result, indent=2))
    print("\n" + table(result["runs"]) + "\n")
    print(f"bench/continual: wrote {out_path}")


if __name__ == "__main__":
    main()
