"""`dstune curve RECIPE --sizes 1,2,4,all`: is fine-tuning worth it at this many examples, or would prompting do?

For each size, the recipe's training split is cut down to that many source records (per stratum where the data has
strata, `data.stratify`, else in total), with one seeded order so that each size holds the smaller ones. Each
method (LoRA, Prefix-Tuning, IA3 by default) trains on it with the same seed, and is scored on the same test split.
Beside them, at the same size: the base model with k demonstrations drawn from that size's records (random and
similar), and a TF-IDF nearest-neighbour classifier with no language model. Zero-shot base is one row.

- A size counts source records only. Augmented copies of the chosen records and the general replay (at the
  recipe's ratio) come along, and are counted apart.
- Small sets train for at least `--min-steps` optimizer steps (train.min_steps: more epochs, no early stop
  before it), so that 8 examples get more than one step; the report says which sizes that changed.
- Methods other than the recipe's own train at their own default learning rate (docs/methods.md), since the
  recipe's rate was chosen for its method.
- Tier 1 (general ability) is off in these runs: the curve is about the domain score.

Writes runs/<name>/curve/curve.{json,md,html} and one run folder per method and size under runs/<name>/curve/.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from .config import FewShotConfig, Recipe, load_recipe
from .data.build import build_dataset, load_split, with_data_defaults
from .data.stratify import field_key, term_key
from .errors import InputError, phase
from .evaluate.fewshot import demonstration_pool, is_source_record, nearest_neighbour_answers
from .evaluate.fewshot import label as few_shot_label
from .evaluate.harness import write_eval
from .evaluate.metrics import METRICS
from .evaluate.stats import bootstrap_ci, paired_bootstrap
from .evaluate.tiers import evaluate_few_shot, evaluate_tiers, without_general
from .plugins import METHODS, unknown_choice

DEFAULT_METHODS = ("lora", "prefix", "ia3")
SHOT_SELECTIONS = ("random", "similar")


def parse_sizes(text: str) -> list[int | None]:
    """`1,2,4,all` -> [1, 2, 4, None] (None: every record), sorted, without repeats."""
    sizes: set[int | None] = set()
    for part in (p.strip() for p in text.split(",")):
        if part == "all":
            sizes.add(None)
        elif part.isdigit() and int(part) > 0:
            sizes.add(int(part))
        else:
            raise InputError(f"--sizes: {part!r} is not a positive whole number or `all` (e.g. --sizes 1,2,4,all)")
    if not sizes:
        raise InputError("--sizes: no size given (e.g. --sizes 1,2,4,all)")
    return sorted((s for s in sizes if s is not None)) + ([None] if None in sizes else [])


def parse_methods(text: str) -> list[str]:
    """Registered method names, each checked (did-you-mean on a typo)."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    for method in methods:
        if method not in METHODS:
            raise InputError(unknown_choice("--methods", method, list(METHODS)))
    if not methods:
        raise InputError("--methods: no method given (e.g. --methods lora,prefix,ia3)")
    return methods


def size_name(size: int | None) -> str:
    return "all" if size is None else str(size)


def stratum_of(recipe: Recipe, per: str):
    """The key that assigns a record to its stratum, and whether sizes count per stratum."""
    options = recipe.data.stratify
    strata = bool(options.key or options.terms)
    if per == "total" or (per == "auto" and not strata):
        return (lambda record: "all"), False
    if not strata:
        raise InputError("--per stratum: the recipe names no strata (data.stratify.key, e.g. meta.category, or "
                         "data.stratify.terms)")
    key = field_key(options.key) if options.key else term_key(options.terms)

    def first(record: dict) -> str:
        strata = key(record)
        return str(strata[0]) if strata else "(none)"

    return first, True


def subsets(train: list[dict], sizes: list[int | None], stratum, seed: int) -> dict:
    """Per size: the chosen source records (nested: a size holds every smaller one), and their books."""
    source = [r for r in train if is_source_record(r)]
    order = random.Random(seed).sample(range(len(source)), len(source))
    rank, seen = [0] * len(source), {}
    for i in order:  # a record's rank within its stratum, in the seeded order
        s = stratum(source[i])
        rank[i] = seen.get(s, 0)
        seen[s] = rank[i] + 1
    out = {}
    for size in sizes:
        chosen = [r for r, k in zip(source, rank) if size is None or k < size]
        out[size] = {"records": chosen, "books": {
            "per_stratum": size, "strata": len(seen), "source_records": len(chosen),
            # What a size can give: every stratum's records up to the size (a stratum with fewer gives all it has).
            "expected": sum(n if size is None else min(n, size) for n in seen.values()),
            "short_strata": 0 if size is None else sum(1 for n in seen.values() if n < size)}}
    return out


def training_split(train: list[dict], chosen: list[dict]) -> tuple[list[dict], dict]:
    """The chosen records with their augmented copies and a share of the replay (at the recipe's ratio)."""
    ids = {r["id"] for r in chosen}
    copies = [r for r in train if (r.get("meta") or {}).get("augmented_from") in ids]
    replay = [r for r in train if (r.get("meta") or {}).get("replay")]
    source = sum(1 for r in train if is_source_record(r))
    replay = replay[: round(len(replay) * len(chosen) / max(source, 1))]
    return chosen + copies + replay, {"augmented_copies": len(copies), "replay": len(replay)}


def write_size_data(data_dir: Path, out: Path, records: list[dict], books: dict) -> None:
    """A dataset folder for one size: its train split, the run's dev and test splits and manifest."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "train.jsonl").open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    for split in ("dev", "test"):
        if (data_dir / f"{split}.jsonl").is_file():
            shutil.copyfile(data_dir / f"{split}.jsonl", out / f"{split}.jsonl")
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["counts"] = {**manifest.get("counts", {}), "train": len(records)}
    manifest["curve"] = books
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))


def method_recipe(recipe: Recipe, method: str, size: int | None, folder: Path, min_steps: int) -> Recipe:
    """The recipe for one method at one size: its own run folder, tier 1 off, a floor on the steps."""
    raw = recipe.model_dump(mode="json")
    train = raw["train"]
    if method != recipe.train.method:
        train["method"] = method
        for key in ("learning_rate", "pretrain_learning_rate", "lr_fraction"):
            train.pop(key, None)  # the recipe's rate suits its own method: this one takes its default
    train["min_steps"] = min_steps
    raw["eval"]["general"]["enabled"] = False
    raw["output_dir"], raw["name"] = str(folder), f"{method}-{size_name(size)}"
    return load_recipe(raw)


def scored_row(result: dict, samples: int) -> dict:
    """Scores with CIs and what each answer costs, from an evaluation result."""
    return {"metrics": result["metrics"], "ci": {k: [v["low"], v["high"]] for k, v in result.get("ci", {}).items()},
            "prompt_tokens_mean": result.get("prompt_tokens_mean"),
            "seconds_per_answer": result.get("seconds_per_answer"), "samples": samples}


def answers(result: dict) -> list[str]:
    return [p["got"] for p in result["predictions"]]


@phase("running the data-efficiency curve")
def run_curve(recipe: Recipe, sizes: list[int | None], methods: list[str], per: str = "auto",
              shots: tuple[str, ...] = SHOT_SELECTIONS, min_steps: int = 30, k: int | None = None) -> dict:
    """Train each method at each size, score it and the in-context baselines on the test split; write the report."""
    from .api import load
    from .train.loop import train as train_stage

    data_dir = build_dataset(recipe)
    recipe = with_data_defaults(recipe, data_dir)
    options = recipe.eval
    folder = recipe.run_dir / "curve"
    folder.mkdir(parents=True, exist_ok=True)
    train, test = load_split(data_dir, "train"), load_split(data_dir, "test")[: options.max_samples]
    test = [r for r in test if "messages" in r]
    if not test:
        raise InputError(f"{data_dir}: no test records with an answer to score the curve on")
    stratum, per_stratum = stratum_of(recipe, per)
    cut = subsets(train, sizes, stratum, recipe.train.seed)
    references = [r["messages"][-1]["content"] for r in test]
    few = recipe.eval.few_shot or FewShotConfig()
    k = k or few.k
    metric = options.metrics[0]
    metric_fn = METRICS[metric]
    samples = options.bootstrap_samples or 1000

    def ci(texts: list[str]) -> dict:
        return {name: bootstrap_ci(METRICS[name], texts, references, samples) for name in options.metrics}

    base_model, tokenizer = load(recipe)
    print("dstune curve: zero-shot base", flush=True)
    zero = evaluate_tiers(without_general(recipe), base_model, tokenizer, test, progress="eval base")
    write_eval(zero, folder / "base.json")
    rows = [{"system": "base 0-shot", "kind": "base", "size": None, **scored_row(zero, len(test))}]
    texts_of = {"base 0-shot": answers(zero)}
    for size in sizes:
        chosen = cut[size]["records"]
        pool = demonstration_pool(chosen, test, recipe.data.quality.leakage, recipe.data.quality.near_threshold)
        start = time.perf_counter()
        nn = nearest_neighbour_answers(pool, test) if pool.records else [""] * len(test)
        scores = {name: METRICS[name](nn, references) for name in options.metrics}
        name = f"tfidf-1nn @{size_name(size)}"
        rows.append({"system": "tfidf-1nn", "kind": "classifier", "size": size, "metrics": scores,
                     "ci": {n: [c["low"], c["high"]] for n, c in ci(nn).items()}, "prompt_tokens_mean": 0,
                     "seconds_per_answer": round((time.perf_counter() - start) / len(test), 6),
                     "samples": len(test), "books": cut[size]["books"]})
        texts_of[name] = nn
        for select in shots:
            if len(pool.records) < k:
                print(f"dstune curve: {k}-shot {select} @{size_name(size)} skipped: the pool has "
                      f"{len(pool.records)} records", flush=True)
                continue
            shot = FewShotConfig(k=k, select=select, seed=few.seed)
            shot_recipe = recipe.model_copy(update={"eval": options.model_copy(update={"few_shot": shot})})
            label = few_shot_label(shot)
            print(f"dstune curve: base {label} @{size_name(size)}", flush=True)
            result = evaluate_few_shot(shot_recipe, base_model, tokenizer, test, chosen,
                                       progress=f"eval {label} @{size_name(size)}")
            write_eval(result, folder / f"base-{k}shot-{select}-{size_name(size)}.json")
            rows.append({"system": label, "kind": "in-context", "size": size,
                         **scored_row(result, len(test)), "books": cut[size]["books"],
                         "pool": result["few_shot"]["pool"]})
            texts_of[f"{label} @{size_name(size)}"] = answers(result)
    del base_model

    for size in sizes:
        records, extra = training_split(train, cut[size]["records"])
        books = {**cut[size]["books"], **extra, "trained_records": len(records)}
        size_dir = folder / f"data-{size_name(size)}"
        write_size_data(data_dir, size_dir, records, books)
        for method in methods:
            run_recipe = method_recipe(recipe, method, size, folder, min_steps)
            print(f"dstune curve: {method} @{size_name(size)} ({books['source_records']} source records, "
                  f"{len(records)} trained)", flush=True)
            trained = train_stage(run_recipe, size_dir)
            run_recipe = with_data_defaults(run_recipe, size_dir)
            result = evaluate_tiers(run_recipe, trained.model, tokenizer, test,
                                    progress=f"eval {method} @{size_name(size)}")
            write_eval(result, run_recipe.run_dir / "eval" / "tuned.json")
            summary = trained.summary
            rows.append({"system": method, "kind": "fine-tuned", "size": size,
                         **scored_row(result, len(test)), "books": books,
                         "trainable_parameters": summary["trainable_parameters"],
                         "optimizer_steps": summary["optimizer_steps"], "max_steps_from": summary["max_steps_from"],
                         "epochs": summary["epochs"], "learning_rate": summary["learning_rate"],
                         "train_seconds": summary["train_seconds"], "adapter": str(trained.adapter_dir)})
            texts_of[f"{method} @{size_name(size)}"] = answers(result)
            del trained

    crossover = crossovers(rows, texts_of, references, metric, metric_fn, methods, sizes, samples)
    report = {"schema": "dstune.curve/1", "recipe": recipe.name, "metric": metric, "metrics": options.metrics,
              "per_stratum": per_stratum, "strata": cut[sizes[0]]["books"]["strata"], "sizes": sizes,
              "methods": methods, "k": k, "min_steps": min_steps, "test_samples": len(test), "rows": rows,
              "crossover": crossover}
    write_curve_report(report, folder)
    return report


def crossovers(rows, texts_of, references, metric, metric_fn, methods, sizes, samples) -> dict:
    """Per method: the smallest size where it beats every in-context baseline and the 1-NN classifier at that size
    (a paired bootstrap on the first metric), and where its point estimate first passes them."""
    out = {}
    for method in methods:
        found, point = None, None
        comparisons = []
        for size in sizes:
            mine = texts_of.get(f"{method} @{size_name(size)}")
            rivals = [r for r in rows if r["size"] == size and r["kind"] in ("in-context", "classifier")]
            if mine is None or not rivals:
                continue
            tests = {}
            for rival in rivals:
                name = f"{rival['system']} @{size_name(size)}"
                tests[rival["system"]] = paired_bootstrap(metric_fn, texts_of[name], mine, references, samples)
            comparisons.append({"size": size, "against": tests})
            if point is None and all(t["diff"] > 0 for t in tests.values()):
                point = size
            if found is None and all(t["significant"] and t["diff"] > 0 for t in tests.values()):
                found = size
        out[method] = {"significant_at": found, "point_estimate_at": point, "found": found is not None,
                       "comparisons": comparisons}
    return out


def curve_table(report: dict) -> str:
    """Markdown: one row per system and size, the first metric with its CI, cost and training figures."""
    metric = report["metric"]
    lines = [f"| system | examples{' per stratum' if report['per_stratum'] else ''} | source records | {metric} [95% CI] "
             "| prompt tokens | s/answer | trainable params | steps | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        books = row.get("books") or {}
        value, ci = row["metrics"].get(metric), row.get("ci", {}).get(metric)
        score = "-" if value is None else f"{value:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        steps = row.get("optimizer_steps")
        if steps is not None and row.get("max_steps_from") == "train.min_steps":
            steps = f"{steps} (min_steps)"
        cells = [row["system"], "-" if row["kind"] == "base" else size_name(row["size"]),
                 books.get("source_records", "-"), score, row.get("prompt_tokens_mean", "-"),
                 row.get("seconds_per_answer", "-"), f"{row['trainable_parameters']:,}" if row.get("trainable_parameters") else "-",
                 "-" if steps is None else steps, row.get("train_seconds", "-")]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def write_curve_report(report: dict, folder: Path) -> Path:
    """curve.json, curve.md and curve.html (with the plot of score against examples)."""
    from .htmlreport import markdown_html

    (folder / "curve.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    parts = [f"# dstune curve: {report['recipe']}", "",
             f"Test samples: {report['test_samples']}. Sizes count source records"
             f"{' per stratum (' + str(report['strata']) + ' strata)' if report['per_stratum'] else ''}; augmented "
             f"copies and replay come along and are counted apart. In-context baselines draw {report['k']} "
             "demonstrations from the same records as the fine-tuned runs at that size. Small sets train for at "
             f"least {report['min_steps']} optimizer steps (train.min_steps: more epochs, no early stop before it).",
             "", curve_table(report), "", "## Where fine-tuning overtakes prompting", ""]
    for method, found in report["crossover"].items():
        significant = size_name(found["significant_at"]) if found["found"] else "not within the sizes run"
        point = size_name(found["point_estimate_at"]) if found["point_estimate_at"] is not None else "never"
        parts.append(f"- {method}: beats every in-context baseline and the 1-NN classifier at the same size from "
                     f"{significant} (paired bootstrap, 95%); point estimate ahead from {point}.")
    books = [r for r in report["rows"] if r["kind"] == "fine-tuned"]
    if books:
        parts += ["", "## Books per size", "", "| size | source records | expected | short strata | augmented copies "
                  "| replay | trained records |", "|---|---|---|---|---|---|---|"]
        seen = set()
        for row in books:
            b = row["books"]
            if row["size"] in seen:
                continue
            seen.add(row["size"])
            parts.append(f"| {size_name(row['size'])} | {b['source_records']} | {b['expected']} | {b['short_strata']} | "
                         f"{b['augmented_copies']} | {b['replay']} | {b['trained_records']} |")
    markdown = "\n".join(parts) + "\n"
    path = folder / "curve.md"
    path.write_text(markdown)
    (folder / "curve.html").write_text(markdown_html(f"dstune curve: {report['recipe']}", markdown,
                                                     {"curve": curve_png(report)}), encoding="utf-8")
    return path


def curve_png(report: dict) -> bytes:
    """Test score against examples: one line per fine-tuned method and in-context baseline, with 95% CIs."""
    from .htmlreport import figure_png, pyplot

    plt = pyplot()
    metric = report["metric"]
    fig, ax = plt.subplots(figsize=(7, 4))
    systems = []
    for row in report["rows"]:
        if row["kind"] != "base" and row["system"] not in systems:
            systems.append(row["system"])
    for system in systems:
        points = [r for r in report["rows"] if r["system"] == system]
        x = [r["books"]["source_records"] for r in points]
        y = [r["metrics"][metric] for r in points]
        low = [v - (r.get("ci", {}).get(metric) or [v, v])[0] for r, v in zip(points, y)]
        high = [(r.get("ci", {}).get(metric) or [v, v])[1] - v for r, v in zip(points, y)]
        style = "-o" if points[0]["kind"] == "fine-tuned" else "--s" if points[0]["kind"] == "in-context" else ":^"
        ax.errorbar(x, y, yerr=[low, high], fmt=style, capsize=3, label=system)
    base = next((r for r in report["rows"] if r["kind"] == "base"), None)
    if base:
        ax.axhline(base["metrics"][metric], color="gray", linestyle=":", label="base 0-shot")
    ax.set_xscale("log")
    ax.set(xlabel="source training records (log scale)", ylabel=f"test {metric} (95% CI)",
           title="Data efficiency: fine-tuning against prompting")
    ax.legend(fontsize=7)
    return figure_png(fig)
