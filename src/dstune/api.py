"""The Python API: one function per CLI command (`dstune run|data|train|eval|merge|export|chat`)."""

from __future__ import annotations

import json
from pathlib import Path

from .config import Recipe, load_recipe
from .data.build import build_dataset, load_split
from .data.templates import get_template
from .errors import GateError, InputError
from .evaluate.generate import generate
from .evaluate.harness import write_eval
from .evaluate.tiers import compare, evaluate_tiers
from .evaluate.report import build_report, metrics_table, write_report
from .export.artifacts import export_and_score, gate_failures, scoring_recipe, test_records
from .export.formats import get_format
from .export.merge import merge_adapter
from .models.loading import load_model, load_tokenizer, resolve_model_path
from .provenance import load_recipe_or_manifest
from .train.loop import TrainResult
from .train.loop import train as train_stage
from .tuners.methods import is_mergeable, load_adapters


def _recipe(recipe: Recipe | str | Path | dict, overrides: list[str] | None = None) -> Recipe:
    if isinstance(recipe, Recipe):
        return load_recipe(recipe.model_dump(), overrides) if overrides else recipe
    return load_recipe_or_manifest(recipe, overrides)  # a recipe YAML or dict, or a manifest JSON's recipe


def load(recipe: Recipe, model: str | Path | None = None, adapters: dict[str, str | Path] | None = None,
         full_precision: bool = False):
    """The model (base, or a merged/other directory), with named adapters loaded, and its tokenizer.

    A QLoRA recipe loads its base in 4-bit, as it was trained, unless `full_precision` (for merging).
    """
    path = resolve_model_path(str(model) if model else recipe.model.name_or_path)
    tokenizer = load_tokenizer(path, recipe.model.trust_remote_code)
    in_4bit = recipe.model.load_in_4bit and not full_precision
    loaded = load_model(path, recipe.model.dtype, recipe.model.trust_remote_code, in_4bit)
    if adapters:
        loaded = load_adapters(loaded, adapters)
    return loaded, tokenizer


def data(recipe, overrides: list[str] | None = None) -> Path:
    """Build the dataset folder of a recipe."""
    return build_dataset(_recipe(recipe, overrides))


def train(recipe, overrides: list[str] | None = None, resume: bool | str | Path = False) -> TrainResult:
    """Fine-tune on the recipe's dataset folder (built first if missing).

    `resume=True` continues from the newest complete checkpoint, a path from that checkpoint.
    """
    import torch
    from accelerate import PartialState

    recipe = _recipe(recipe, overrides)
    # Under torchrun the main process builds the dataset; the others wait, then read it. (On CPUs accelerate sees
    # the torchrun ranks only when told it runs on CPUs; the state is shared with the loop's Accelerator.)
    with PartialState(cpu=not torch.cuda.is_available()).main_process_first():
        if not (recipe.run_dir / "data" / "train.jsonl").is_file():
            build_dataset(recipe)
    return train_stage(recipe, resume=resume)


def preemption_message(result: TrainResult, command: str) -> str:
    """What to tell the user after SIGTERM stopped training early."""
    return (f"dstune: stopped by SIGTERM after step {result.summary['preempted_at_step']}; checkpoint: "
            f"{result.preempted_checkpoint}; continue with: {command} --resume")


def _eval_on_test(recipe: Recipe, model, tokenizer, tag: str) -> dict | None:
    records = load_split(recipe.run_dir / "data", "test")
    if not records:
        return None
    if recipe.eval.max_samples is not None:
        records = records[: recipe.eval.max_samples]
    result = evaluate_tiers(recipe, model, tokenizer, records, progress=f"eval {tag}")
    write_eval(result, recipe.run_dir / "eval" / f"{tag}.json")
    return result


def evaluate(recipe, overrides: list[str] | None = None, model: str | Path | None = None,
             adapter: str | Path | None = None, tag: str | None = None) -> dict:
    """Score a model (base by default, or a directory, optionally with an adapter) on the test split."""
    recipe = _recipe(recipe, overrides)
    if not (recipe.run_dir / "data" / "test.jsonl").is_file():
        build_dataset(recipe)
    loaded, tokenizer = load(recipe, model, {"default": adapter} if adapter else None)
    result = _eval_on_test(recipe, loaded, tokenizer, tag or ("adapter" if adapter else "model" if model else "base"))
    if result is None:
        raise InputError(f"{recipe.run_dir / 'data'}: no test split to evaluate on")
    return result


def merge(recipe, overrides: list[str] | None = None, adapter: str | Path | None = None,
          out_dir: str | Path | None = None) -> Path:
    """Merge the recipe's trained adapter (or a given one) into the base and save a HF directory."""
    recipe = _recipe(recipe, overrides)
    adapter = Path(adapter or recipe.run_dir / "adapter")
    loaded, tokenizer = load(recipe, adapters={"default": adapter}, full_precision=True)
    if not is_mergeable(loaded):
        raise InputError(f"{adapter}: {loaded.active_peft_config.peft_type.value.lower()} adapters cannot be merged "
                         "into the base weights; serve the base with the adapter instead")
    return merge_adapter(loaded, tokenizer, Path(out_dir or recipe.run_dir / "merged"), recipe)


def chat_session(recipe, overrides: list[str] | None = None, model: str | Path | None = None,
                 adapter: str | Path | None = None, max_new_tokens: int = 128):
    """Load once, then answer prompts greedily with the recipe's template and system prompt."""
    recipe = _recipe(recipe, overrides)
    loaded, tokenizer = load(recipe, model, {"default": adapter} if adapter else None)
    template = get_template(recipe.model.template, tokenizer)
    system = [{"role": "system", "content": recipe.data.system_prompt}] if recipe.data.system_prompt else []

    def answer(prompt: str) -> str:
        conversation = system + [{"role": "user", "content": prompt}]
        return generate(loaded, tokenizer, template, [conversation], 1, max_new_tokens).texts[0]

    return answer


def chat(recipe, prompt: str, overrides: list[str] | None = None, model: str | Path | None = None,
         adapter: str | Path | None = None, max_new_tokens: int = 128) -> str:
    """One greedy answer to a user prompt (with the recipe's system prompt)."""
    return chat_session(recipe, overrides, model, adapter, max_new_tokens)(prompt)


def run(recipe, overrides: list[str] | None = None, resume: bool | str | Path = False) -> dict:
    """The main job: data, base eval, PEFT training, tuned eval, merge (where the method allows) and report.

    `resume` continues training from a checkpoint (see `train`); the data and the base evaluation are rebuilt the
    same way (the generation cache makes the latter quick). When SIGTERM stops the training, returns
    {"preempted": TrainResult} instead of the report.
    """
    recipe = _recipe(recipe, overrides)
    run_dir = recipe.run_dir
    for spec in recipe.export.formats:  # a typo here fails now, not after the training
        get_format(*spec.split(":"))
    print(f"dstune: [1/7] building the dataset into {run_dir / 'data'}", flush=True)
    data_dir = build_dataset(recipe)
    counts = json.loads((data_dir / "manifest.json").read_text())["counts"]
    print(f"dstune:       {counts}", flush=True)

    print("dstune: [2/7] evaluating the base model", flush=True)
    base_model, tokenizer = load(recipe)
    base = _eval_on_test(recipe, base_model, tokenizer, "base")
    del base_model

    print(f"dstune: [3/7] fine-tuning with {recipe.train.method}", flush=True)
    trained = train_stage(recipe, data_dir, resume=resume)
    if "preempted_at_step" in trained.summary:
        return {"preempted": trained}

    print("dstune: [4/7] evaluating the tuned model", flush=True)
    tuned = _eval_on_test(recipe, trained.model, tokenizer, "tuned")

    merged_dir = None
    if not is_mergeable(trained.model):
        print(f"dstune: [5/7] no merge: a {recipe.train.method} adapter does not fold into the base weights", flush=True)
    elif recipe.model.load_in_4bit:
        print("dstune: [5/7] merging the adapter into the full-precision base (not the 4-bit one)", flush=True)
        merged_dir = merge(recipe, adapter=trained.adapter_dir)
    else:
        print("dstune: [5/7] merging the adapter into the base", flush=True)
        merged_dir = merge_adapter(trained.model, tokenizer, run_dir / "merged", recipe)

    exports = []
    if merged_dir and tuned and recipe.export.formats:
        print(f"dstune: [6/7] exporting {', '.join(recipe.export.formats)} and scoring each against fp32", flush=True)
        # The tuned model gives the merged model's answers, unless it ran on a 4-bit base (QLoRA): then score the
        # full-precision merge that the exports are made from.
        reference = merged_reference(recipe, merged_dir) if recipe.model.load_in_4bit else tuned
        exports = [export_and_score(recipe, spec, merged_dir, reference) for spec in recipe.export.formats]
    else:
        print("dstune: [6/7] no export (export.formats is empty, or nothing was merged)", flush=True)

    print("dstune: [7/7] writing the report", flush=True)
    artifacts = {"data": str(data_dir), "adapter": str(trained.adapter_dir), "merged": str(merged_dir) if merged_dir else None,
                 "tensorboard": str(run_dir / "tb"), **{f"export {r['format']}:{r['quant']}": r["artifact"] for r in exports}}
    comparison = compare(base, tuned, recipe) if base and tuned else {}
    report = build_report(recipe, base, tuned, trained.summary, artifacts, comparison, exports)
    report_path = write_report(report, run_dir)
    print("\n" + metrics_table(report) + "\n", flush=True)
    print(f"dstune: report written to {report_path} and {run_dir / 'report.json'}", flush=True)
    gate = comparison.get("retention")
    if gate and gate["passed"] is False:
        message = (f"general ability retention {gate['worst']} < eval.general.min_retention={gate['min_retention']} "
                   f"(accuracy {base['general']['accuracy']:.4f} -> {tuned['general']['accuracy']:.4f}, perplexity "
                   f"{base['general']['perplexity']:.2f} -> {tuned['general']['perplexity']:.2f}); report: {report_path}")
        if recipe.eval.general.on_fail == "error":
            raise GateError(message)
        print(f"dstune: warning: {message}", flush=True)
    failed = gate_failures(exports)
    if failed:
        raise GateError(f"{failed}; report: {report_path}")
    return report


def merged_reference(recipe: Recipe, merged_dir: Path) -> dict:
    """The merged model's scores in full precision (never a QLoRA recipe's 4-bit load): what exports are held to."""
    loaded, tokenizer = load(recipe, merged_dir, full_precision=True)
    return evaluate_tiers(scoring_recipe(recipe), loaded, tokenizer, test_records(recipe), progress="eval fp32")


def export(recipe, overrides: list[str] | None = None, spec: str = "onnx:int8", model: str | Path | None = None) -> dict:
    """Export a merged model (default runs/<name>/merged) as `format:quant`, score it against the fp32 model, gate it.

    The record is added to the run's report when there is one. Raises GateError (exit code 3) below
    `export.min_retention`.
    """
    recipe = _recipe(recipe, overrides)
    if spec.count(":") != 1:
        raise InputError(f"{spec!r}: an export is format:quant, e.g. onnx:int8")
    get_format(*spec.split(":"))  # an unknown format or quantization fails before any evaluation
    merged_dir = Path(model or recipe.run_dir / "merged")
    if not (merged_dir / "config.json").is_file():
        raise InputError(f"{merged_dir}: no merged model; run `dstune merge` (or `dstune run`) first, or give --model")
    if not (recipe.run_dir / "data" / "test.jsonl").is_file():
        build_dataset(recipe)
    record = export_and_score(recipe, spec, merged_dir, merged_reference(recipe, merged_dir))
    report_file = recipe.run_dir / "report.json"
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        report["exports"] = [r for r in report.get("exports") or []
                             if (r["format"], r["quant"]) != (record["format"], record["quant"])] + [record]
        write_report(report, recipe.run_dir)
    failed = gate_failures([record])
    if failed:
        raise GateError(failed)
    return record
