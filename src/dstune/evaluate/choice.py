"""Metrics chosen from the data when a recipe names none: exact match for short labels, ROUGE-L for long answers.

exact_match on a long-form answer (a paragraph of clinical advice) is 0.000 before and after training, whatever the
model learned; early stopping on it keeps the first checkpoint, and the 16 new tokens of `eval.max_new_tokens`
cut the answer off. So when `eval.metrics`, `train.metric` or `eval.max_new_tokens` is not in the recipe, the data
stage looks at the reference answers and chooses all three together; the data manifest and the report say what
was chosen and why. A value the recipe sets is never changed.
"""

from __future__ import annotations

import math
from typing import Callable

# A reference answer of at most this many tokens (median) is a label: exact match fits it.
SHORT_ANSWER_TOKENS = 8
LONG_METRICS = ["rougeL", "contains_answer"]  # rougeL splits Chinese by character (dstune.evaluate.metrics)


def reference_answers(records: list[dict]) -> list[str]:
    """The last assistant turn of each conversation record (raw-text records have none)."""
    return [r["messages"][-1]["content"] for r in records
            if r.get("messages") and r["messages"][-1]["role"] == "assistant"]


def choose_metrics(answers: list[str], count_tokens: Callable[[list[str]], list[int]], max_length: int) -> dict:
    """{"eval.metrics", "train.metric", "eval.max_new_tokens", "why"} for these reference answers."""
    if not answers:
        return {}
    tokens = sorted(count_tokens(answers))
    median = tokens[len(tokens) // 2]
    p95 = tokens[min(len(tokens) - 1, math.ceil(0.95 * len(tokens)) - 1)]
    # Room for 95% of the answers and a quarter more, in steps of 16 tokens, within the sample length.
    room = max(16, min(max_length, 16 * math.ceil(1.25 * p95 / 16)))
    numbers = f"median {median} tokens, 95th percentile {p95}, over {len(answers)} reference answers"
    if median <= SHORT_ANSWER_TOKENS:
        # contains_answer as well: a chatty model ('The opposite of "hot" is "cold"') scores 0 on exact match.
        return {"eval.metrics": ["exact_match", "contains_answer"], "train.metric": "exact_match",
                "eval.max_new_tokens": room,
                "why": f"short answers ({numbers}): labels, scored by exact match, and contains_answer for answers "
                       "that wrap the label in a sentence"}
    return {"eval.metrics": list(LONG_METRICS), "train.metric": LONG_METRICS[0], "eval.max_new_tokens": room,
            "why": f"long answers ({numbers}): exact match would be 0 whatever the model learned, so ROUGE-L "
                   "(Chinese by character) and contains_answer"}


def recipe_choice(recipe, answers: list[str], count_tokens: Callable[[list[str]], list[int]]) -> dict | None:
    """The choice for what the recipe leaves unset, with the keys it fills (`applied`); None when it sets all."""
    applied = unset_keys(recipe)
    choice = choose_metrics(answers[:5000], count_tokens, recipe.data.max_length) if applied else {}
    return {**choice, "applied": [k for k in applied if k in choice]} if choice else None


def unset_keys(recipe) -> list[str]:
    """The keys of a choice that the recipe leaves to the data."""
    keys = []
    if "metrics" not in recipe.eval.model_fields_set:
        keys.append("eval.metrics")
    if "metric" not in recipe.train.model_fields_set:
        keys.append("train.metric")
    if "max_new_tokens" not in recipe.eval.model_fields_set:
        keys.append("eval.max_new_tokens")
    return keys


def apply_choice(recipe, choice: dict | None):
    """The recipe with the chosen values where it sets none (the same recipe when it sets them all)."""
    keys = [k for k in unset_keys(recipe) if choice and k in choice]
    if not keys:
        return recipe
    sections = {}
    for key in keys:
        section, field = key.split(".")
        sections.setdefault(section, {})[field] = choice[key]
    # model_copy keeps model_fields_set, plus the updated fields: applying twice changes nothing.
    return recipe.model_copy(update={s: getattr(recipe, s).model_copy(update=v) for s, v in sections.items()})
