"""Domain metrics, from a registry: each maps predictions and references to a score in [0, 1]."""

from __future__ import annotations

import re
from typing import Callable

MetricFn = Callable[[list[str], list[str]], float]

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def final_answer(text: str) -> str:
    """The answer without a reasoning block, surrounding whitespace or a closing period."""
    text = _THINK.sub("", text)
    if "</think>" in text:  # a template that opens <think> in the prompt
        text = text.split("</think>", 1)[1]
    return text.strip().rstrip(".").strip()


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of answers equal to the reference, ignoring case, whitespace and <think> blocks."""
    if not references:
        return 0.0
    hits = sum(final_answer(p).casefold() == final_answer(r).casefold() for p, r in zip(predictions, references))
    return hits / len(references)


def valid_icd10(predictions: list[str], references: list[str]) -> float:
    """Share of answers that are valid ICD-10-CM codes."""
    from ..data.icd10 import is_valid_code

    if not predictions:
        return 0.0
    return sum(is_valid_code(final_answer(p)) for p in predictions) / len(predictions)


METRICS: dict[str, MetricFn] = {"exact_match": exact_match, "valid_icd10": valid_icd10}


def register_metric(name: str, metric: MetricFn) -> None:
    """Add a metric to the registry (recipes name it in `eval.metrics`)."""
    METRICS[name] = metric
