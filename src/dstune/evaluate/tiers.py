"""The three evaluation tiers of one model, and base vs tuned: what `dstune eval` and `dstune run` report.

Tier 1: general capability kept (evaluate.general). Tier 2: domain metrics. Both with bootstrap CIs. Tier 3:
business end-to-end checks (evaluate.checks). Every model is scored on the same records with the same decoding, so any
two results (base, tuned, merged, an export) compare sample by sample.
"""

from __future__ import annotations

from ..data.templates import get_template
from ..errors import phase
from .cache import default_cache
from .checks import build_checks, run_checks
from .fewshot import check_pool_size, demonstration_pool, few_shot_records
from .fewshot import label as few_shot_label
from .general import general_eval, retention
from .harness import evaluate_records
from .metrics import METRICS
from .stats import bootstrap_ci, paired_bootstrap


@phase("evaluating")
def evaluate_tiers(recipe, model, tokenizer, records: list[dict], progress: str | None = None) -> dict:
    """Domain metrics (with CIs), business checks and general figures of one model on the test records."""
    options = recipe.eval
    template = get_template(recipe.model.template, tokenizer)
    records = [r for r in records if "messages" in r]
    checks = build_checks(options.checks)  # bad check options fail before any generation
    cache = default_cache() if options.cache else None
    result = evaluate_records(model, tokenizer, template, records, options.metrics, options.batch_size,
                              options.max_new_tokens, progress, cache)
    answers = [p["got"] for p in result["predictions"]]
    references = [p["expected"] for p in result["predictions"]]
    if options.bootstrap_samples:
        result["ci"] = {name: bootstrap_ci(METRICS[name], answers, references, options.bootstrap_samples)
                        for name in options.metrics}
    if checks:
        result["checks"] = run_checks(checks, answers, records)
    if options.general.enabled:
        result["general"] = general_eval(model, tokenizer, template, options.general, options.batch_size,
                                         f"{progress} general" if progress else None, cache, options.bootstrap_samples)
    return result


def without_general(recipe):
    """The recipe with tier 1 (general ability) turned off, for evaluations that only score the domain."""
    general_off = recipe.eval.general.model_copy(update={"enabled": False})
    return recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"general": general_off})})


@phase("evaluating with k-shot prompts")
def evaluate_few_shot(recipe, model, tokenizer, records: list[dict], train_records: list[dict],
                      progress: str | None = None) -> dict:
    """Tier 2 and tier 3 of one model with `eval.few_shot`'s k demonstrations from `train_records` in each prompt.

    Tier 1 is left out: demonstrations of the domain say nothing of the model's general ability.
    """
    options, quality = recipe.eval.few_shot, recipe.data.quality
    records = [r for r in records if "messages" in r]
    pool = demonstration_pool(train_records, records, quality.leakage, quality.near_threshold)
    shots, shown = few_shot_records(pool, records, options.k, options.select, options.seed)
    result = evaluate_tiers(without_general(recipe), model, tokenizer, shots, progress)
    result["few_shot"] = {"label": few_shot_label(options), **options.model_dump(), "pool": pool.books(),
                          "demonstrations": shown}
    return result


def check_few_shot_pool(recipe, records: list[dict], train_records: list[dict]) -> None:
    """Before any model loads: the pool `evaluate_few_shot` will draw from holds at least k demonstrations."""
    quality = recipe.data.quality
    records = [r for r in records if "messages" in r]
    check_pool_size(demonstration_pool(train_records, records, quality.leakage, quality.near_threshold),
                    recipe.eval.few_shot.k)


def paired_comparison(a: dict, b: dict, recipe) -> dict | None:
    """b against a per domain metric, by a paired bootstrap, when both answered the same records in order."""
    options = recipe.eval
    if [p["id"] for p in a["predictions"]] != [p["id"] for p in b["predictions"]] or not options.bootstrap_samples:
        return None
    answers_a = [p["got"] for p in a["predictions"]]
    answers_b = [p["got"] for p in b["predictions"]]
    references = [p["expected"] for p in a["predictions"]]
    return {name: paired_bootstrap(METRICS[name], answers_a, answers_b, references, options.bootstrap_samples)
            for name in options.metrics}


def compare(base: dict, tuned: dict, recipe) -> dict:
    """Tuned vs base: a paired bootstrap per domain metric, completion rates, and general retention with the gate."""
    options = recipe.eval
    out: dict = {}
    paired = paired_comparison(base, tuned, recipe)
    if paired:
        out["paired"] = paired
    if "checks" in base and "checks" in tuned:
        out["completion_rate"] = {"base": base["checks"]["completion_rate"],
                                  "tuned": tuned["checks"]["completion_rate"]}
    if "general" in base and "general" in tuned:
        out["retention"] = {**retention(base["general"], tuned["general"], options.general.min_retention,
                                        options.bootstrap_samples), "on_fail": options.general.on_fail}
    return out
