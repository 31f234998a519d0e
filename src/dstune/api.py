"""The Python API: one function per CLI command (`dstune run|data|train|eval|curve|merge|export|prune|chat`)."""

from __future__ import annotations

import json
from pathlib import Path

from .config import Recipe, load_recipe
from .data.build import build_dataset, checked_file, load_split, with_data_defaults
from .data.templates import get_template
from .errors import GateError, InputError
from .evaluate.choice import apply_choice, recipe_choice, reference_answers
from .evaluate.generate import generate
from .evaluate.fewshot import label as few_shot_label
from .evaluate.harness import write_eval
from .evaluate.tiers import check_few_shot_pool, compare, evaluate_few_shot, evaluate_tiers, paired_comparison
from .evaluate.report import build_report, metrics_table, write_report
from .export.artifacts import export_and_score, gate_failures, scoring_recipe, test_records
from .export.formats import get_format
from .export.merge import merge_adapter
from .models.loading import load_model, load_tokenizer, resolve_model_path
from .preflight import check_model, check_recipe
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
    recipe = _recipe(recipe, overrides)
    check_recipe(recipe)
    return build_dataset(recipe)


def train(recipe, overrides: list[str] | None = None, resume: bool | str | Path = False) -> TrainResult:
    """Fine-tune on the recipe's dataset folder (built first if missing).

    `resume=True` continues from the newest complete checkpoint, a path from that checkpoint.
    """
    import torch
    from accelerate import PartialState

    recipe = _recipe(recipe, overrides)
    check_recipe(recipe)
    # Under torchrun the main process builds the dataset; the others wait, then read it. (On CPUs accelerate sees
    # the torchrun ranks only when told it runs on CPUs; the state is shared with the loop's Accelerator.)
    with PartialState(cpu=not torch.cuda.is_available()).main_process_first():
        if not (recipe.run_dir / "data" / "train.jsonl").is_file():
            build_dataset(recipe)
    return train_stage(recipe, resume=resume)  # it applies the dataset's metric choice (with_data_defaults)


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


def few_shot_tag(recipe: Recipe, tag: str) -> str:
    """The file name of a k-shot evaluation: `base-5shot-random`."""
    return f"{tag}-{recipe.eval.few_shot.k}shot-{recipe.eval.few_shot.select}"


def _few_shot_on_test(recipe: Recipe, model, tokenizer, tag: str, records: list[dict] | None = None) -> dict | None:
    """The model with `eval.few_shot`'s demonstrations (from the run's training split) in each test prompt."""
    data_dir = recipe.run_dir / "data"
    if records is None:
        records = load_split(data_dir, "test")[: recipe.eval.max_samples]
    if not records:
        return None
    name = few_shot_tag(recipe, tag)
    result = evaluate_few_shot(recipe, model, tokenizer, records, load_split(data_dir, "train"), progress=f"eval {name}")
    write_eval(result, recipe.run_dir / "eval" / f"{name}.json")
    return result


def evaluate(recipe, overrides: list[str] | None = None, model: str | Path | None = None,
             adapter: str | Path | None = None, tag: str | None = None, test_file: str | Path | None = None) -> dict:
    """Score a model (base by default, or a directory, optionally with an adapter) on the test split.

    With `test_file`, on that file alone: the file gets the data stage's checks (each drop counted), and the
    result and a report go to runs/<name>/eval/<tag>.json and runs/<name>/eval/<tag>/.

    With `eval.few_shot` set, the model answers with k demonstrations from the run's training split in each prompt
    (the dataset is built first if need be), and the tag gets `-<k>shot-<select>`.
    """
    recipe = _recipe(recipe, overrides)
    few_shot = recipe.eval.few_shot is not None
    check_recipe(recipe, data=test_file is None or few_shot, model=model)
    tag = tag or ("adapter" if adapter else "model" if model else "base")
    if test_file is None or few_shot:
        if not (recipe.run_dir / "data" / "train.jsonl").is_file():
            build_dataset(recipe)
    if test_file is None:
        recipe = with_data_defaults(recipe)
        if few_shot:
            check_few_shot_pool(recipe, load_split(recipe.run_dir / "data", "test")[: recipe.eval.max_samples],
                                load_split(recipe.run_dir / "data", "train"))
        loaded, tokenizer = load(recipe, model, {"default": adapter} if adapter else None)
        result = (_few_shot_on_test if few_shot else _eval_on_test)(recipe, loaded, tokenizer, tag)
        if result is None:
            raise InputError(f"{recipe.run_dir / 'data'}: no test split to evaluate on")
        return result
    records, quality = checked_file(recipe, test_file)
    if not any("messages" in r for r in records):
        raise InputError(f"{test_file}: no records with an answer to score are left (dropped: "
                         f"{quality['splits']['test']['dropped']})")
    if recipe.eval.max_samples is not None:
        records = records[: recipe.eval.max_samples]
    if few_shot:
        check_few_shot_pool(recipe, records, load_split(recipe.run_dir / "data", "train"))
    loaded, tokenizer = load(recipe, model, {"default": adapter} if adapter else None)
    # Metrics for what the recipe leaves unset, chosen from this file's answers.
    choice = recipe_choice(recipe, reference_answers(records),
                           lambda texts: [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]])
    recipe = apply_choice(recipe, choice)
    if few_shot:
        tag = few_shot_tag(recipe, tag)
        result = evaluate_few_shot(recipe, loaded, tokenizer, records, load_split(recipe.run_dir / "data", "train"),
                                   progress=f"eval {tag}")
    else:
        result = evaluate_tiers(recipe, loaded, tokenizer, records, progress=f"eval {tag}")
    result["data"] = {"test_file": str(test_file), "quality": quality}
    if choice:
        result["metric_choice"] = choice
    write_eval(result, recipe.run_dir / "eval" / f"{tag}.json")
    artifacts = {"test file": str(test_file), "model": str(model or recipe.model.name_or_path),
                 "adapter": str(adapter) if adapter else None}
    scored = {"base": None, "tuned": result} if adapter or model else {"base": result, "tuned": None}
    report = {**build_report(recipe, **scored, train_summary=None, artifacts=artifacts), "test_data": result["data"],
              "metric_choice": choice}
    result["report"] = str(write_report(report, recipe.run_dir / "eval" / tag))
    return result


def merge(recipe, overrides: list[str] | None = None, adapter: str | Path | None = None,
          out_dir: str | Path | None = None) -> Path:
    """Merge the recipe's trained adapter (or a given one) into the base and save a HF directory."""
    recipe = _recipe(recipe, overrides)
    check_model(recipe)
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
    check_model(recipe, model)
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


def serve(recipe, options, engine: str = "torch", max_lora_rank: int = 16, dry_run: bool = False,
          tensor_parallel: int = 1) -> None:
    """Serve the model over OpenAI's API (`dstune serve`): dstune's engine, or vLLM launched with the adapters."""
    from .serve import check_options

    recipe = _recipe(recipe)
    check_options(options)
    if tensor_parallel != 1 and engine != "vllm":
        raise InputError("--tp: the server shards a model through vLLM (--engine vllm --tp N, on GPUs); dstune's "
                         "own engine serves from one process (`dstune chat|eval --tp N` run sharded on CPUs too)")
    if options.engine != "onnx":
        check_model(recipe, options.model)
    if engine == "vllm":
        from .serve.vllm import jinja_template, launch, vllm_command

        template_file = (recipe.run_dir / "serve" / "chat_template.jinja").resolve()
        # A GGUF (the embedded default too) resolves to the Hugging Face folder dstune converted it to.
        path = resolve_model_path(str(options.model or recipe.model.name_or_path))
        command = vllm_command(recipe, options.adapters, str(path), options.host, options.port, max_lora_rank,
                               template_file, options.max_model_len, tensor_parallel)
        tokenizer = load_tokenizer(path, recipe.model.trust_remote_code)
        template_file.parent.mkdir(parents=True, exist_ok=True)
        template_file.write_text(jinja_template(get_template(recipe.model.template, tokenizer),
                                                recipe.data.system_prompt, tokenizer))
        launch(command, options.api_key, dry_run)
        return
    from .serve import serve as serve_torch

    serve_torch(recipe, options)


def run(recipe, overrides: list[str] | None = None, resume: bool | str | Path = False) -> dict:
    """The main job: data, base eval, PEFT training, tuned eval, merge (where the method allows) and report.

    `resume` continues training from a checkpoint (see `train`); the data and the base evaluation are rebuilt the
    same way (the generation cache makes the latter quick). When SIGTERM stops the training, returns
    {"preempted": TrainResult} instead of the report.
    """
    recipe = _recipe(recipe, overrides)
    run_dir = recipe.run_dir
    check_recipe(recipe)  # a typo anywhere fails now, not after the training
    print(f"dstune: [1/7] building the dataset into {run_dir / 'data'}", flush=True)
    data_dir = build_dataset(recipe)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    print(f"dstune:       {manifest['counts']}", flush=True)
    recipe = with_data_defaults(recipe, data_dir)
    choice = manifest.get("metric_choice")
    if choice and choice["applied"]:
        print(f"dstune:       metrics chosen from the data: {', '.join(recipe.eval.metrics)}; "
              f"{choice['why']}", flush=True)

    if recipe.eval.few_shot:  # a k the pool cannot give fails now, not after the base model's evaluation
        check_few_shot_pool(recipe, load_split(data_dir, "test")[: recipe.eval.max_samples],
                            load_split(data_dir, "train"))
    print("dstune: [2/7] evaluating the base model", flush=True)
    base_model, tokenizer = load(recipe)
    base = _eval_on_test(recipe, base_model, tokenizer, "base")
    few_shot = None
    if recipe.eval.few_shot:
        print(f"dstune:       and with {few_shot_label(recipe.eval.few_shot)} demonstrations from the training split",
              flush=True)
        few_shot = _few_shot_on_test(recipe, base_model, tokenizer, "base")
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
    if few_shot and tuned:
        comparison["few_shot_paired"] = paired_comparison(few_shot, tuned, recipe)
    report = build_report(recipe, base, tuned, trained.summary, artifacts, comparison, exports, few_shot)
    report["metric_choice"] = choice if choice and choice["applied"] else None
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


def curve(recipe, overrides: list[str] | None = None, sizes: str | None = None, methods: str = "lora,prefix,ia3",
          per: str = "auto", shots: str = "random,similar", k: int | None = None, min_steps: int = 30) -> dict:
    """The data-efficiency curve (dstune.curve): each method at each size, against k-shot prompting and 1-NN.

    Returns the curve report, with `table` (markdown) and `path` (curve.md) added. Every argument is checked
    before anything runs.
    """
    from .curve import SHOT_SELECTIONS, curve_table, parse_methods, parse_sizes, run_curve, stratum_of

    recipe = _recipe(recipe, overrides)
    _, per_stratum = stratum_of(recipe, per)
    size_list = parse_sizes(sizes or ("1,2,4,all" if per_stratum else "8,32,128,all"))
    method_list = parse_methods(methods)
    chosen = [] if shots.strip() == "none" else SHOT_SELECTIONS if shots.strip() == "both" else \
        [s.strip() for s in shots.split(",") if s.strip()]
    for select in chosen:
        if select not in SHOT_SELECTIONS:
            raise InputError(f"--shots: {select!r} is not one of random, similar, both, none")
    if k is not None and k < 1:
        raise InputError(f"--k: {k} demonstrations; give 1 or more")
    if min_steps < 0:
        raise InputError(f"--min-steps: {min_steps}; give 0 or more")
    check_recipe(recipe)
    report = run_curve(recipe, size_list, method_list, per, tuple(chosen), min_steps, k)
    return {**report, "table": curve_table(report), "path": str(recipe.run_dir / "curve" / "curve.md")}


def prune(recipe, overrides: list[str] | None = None, model: str | Path | None = None,
          out_dir: str | Path | None = None) -> dict:
    """Structured pruning of the merged model (default runs/<name>/merged) by the recipe's `prune` ratios, scored on
    train-split records; saves a plain HF directory (default runs/<name>/pruned) and returns its manifest."""
    import torch
    from transformers import AutoConfig

    from .compress.prune import Importance, apply_plan, make_plan, parameters, score
    from .export.calibrate import calibration_samples
    from .provenance import provenance

    recipe = _recipe(recipe, overrides)
    settings = recipe.prune
    if not (settings.heads or settings.mlp or settings.layers):
        raise InputError("prune: nothing to remove; set prune.heads, prune.mlp or prune.layers (shares, e.g. 0.25)")
    source = Path(model or recipe.run_dir / "merged")
    if not (source / "config.json").is_file():
        raise InputError(f"{source}: no merged model; run `dstune merge` (or `dstune run`) first, or give --model")
    config = AutoConfig.from_pretrained(source, trust_remote_code=recipe.model.trust_remote_code)
    layers = getattr(config, "num_hidden_layers", 0)
    heads = getattr(config, "num_attention_heads", 0)
    if not layers or not heads:
        raise InputError(f"{source}: prune needs a decoder config with num_hidden_layers and num_attention_heads")
    ratios = {"heads": settings.heads, "mlp": settings.mlp, "layers": settings.layers, "head_mode": settings.head_mode}
    # The ratios against the config's shapes, before any model loads (neutral scores).
    make_plan(config, Importance([torch.zeros(heads)] * layers, [torch.zeros(config.intermediate_size)] * layers,
                                 [0.0] * layers), **ratios)
    if not (recipe.run_dir / "data" / "train.jsonl").is_file():
        build_dataset(recipe)
    loaded = load_model(str(source), "float32", recipe.model.trust_remote_code, False)
    tokenizer = load_tokenizer(source, recipe.model.trust_remote_code)
    calibration = calibration_samples(recipe, tokenizer, settings.calibration_samples)
    before = parameters(loaded)
    importance = score(loaded, calibration.samples)
    plan = make_plan(loaded.config, importance, **ratios)
    apply_plan(loaded, plan)
    out = Path(out_dir or recipe.run_dir / "pruned")
    out.mkdir(parents=True, exist_ok=True)
    loaded.save_pretrained(out)
    tokenizer.save_pretrained(out)
    after = parameters(loaded)
    manifest = {
        "source": str(source), "out": str(out), **ratios, "parameters": after, "source_parameters": before,
        "parameter_ratio": round(after / before, 4), "importance": "activation (heads, MLP channels), "
        "block influence (layers)", "calibration": calibration.manifest(), "plan": plan.to_dict(),
        "scores": {"block_influence": [round(i, 6) for i in importance.influence]},
        "provenance": provenance(recipe),
    }
    (out / "dstune_prune.json").write_text(json.dumps(manifest, indent=2))
    return manifest


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
    check_recipe(recipe, model=merged_dir)
    if not (recipe.run_dir / "data" / "test.jsonl").is_file():
        build_dataset(recipe)
    recipe = with_data_defaults(recipe)
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
