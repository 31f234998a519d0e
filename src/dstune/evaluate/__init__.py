"""Evaluation: batched generation, a metric registry and the harness that scores a split."""

from .generate import generate
from .harness import evaluate_records
from .metrics import METRICS, exact_match, register_metric

__all__ = ["METRICS", "evaluate_records", "exact_match", "generate", "register_metric"]
