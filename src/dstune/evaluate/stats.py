"""Bootstrap statistics for metric scores: confidence intervals and paired comparisons of two systems."""

from __future__ import annotations

import numpy as np

from .metrics import MetricFn


def _resample(n: int, samples: int, seed: int) -> np.ndarray:
    """Bootstrap indices, one resample of the n items per row: shape (samples, n)."""
    return np.random.RandomState(seed).randint(0, n, size=(samples, n))


def _scores(metric: MetricFn, predictions: list[str], references: list[str], rows: np.ndarray) -> np.ndarray:
    """The metric on every resample (metrics take lists, so this loop cannot be vectorised)."""
    return np.array([metric([predictions[i] for i in row], [references[i] for i in row]) for row in rows])


def bootstrap_ci(metric: MetricFn, predictions: list[str], references: list[str], samples: int = 1000,
                 seed: int = 0, alpha: float = 0.05) -> dict:
    """The metric with a percentile bootstrap (1 - alpha) confidence interval: value, low, high, samples."""
    value = float(metric(predictions, references))
    scores = _scores(metric, predictions, references, _resample(len(references), samples, seed))
    low, high = np.percentile(scores, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    # The percentile interval of a skewed statistic on a tiny set can miss the point estimate; widen it to keep it.
    return {"value": value, "low": min(float(low), value), "high": max(float(high), value), "samples": samples}


def paired_bootstrap(metric: MetricFn, predictions_a: list[str], predictions_b: list[str], references: list[str],
                     samples: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Whether system b beats a: both scored on the same resamples; CI and two-sided p-value of b - a."""
    a, b = float(metric(predictions_a, references)), float(metric(predictions_b, references))
    rows = _resample(len(references), samples, seed)
    diffs = _scores(metric, predictions_b, references, rows) - _scores(metric, predictions_a, references, rows)
    low, high = (float(x) for x in np.percentile(diffs, [100 * alpha / 2, 100 * (1 - alpha / 2)]))
    p_value = min(1.0, 2 * min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0))))
    return {"a": a, "b": b, "diff": b - a, "low": low, "high": high, "p_value": p_value,
            "significant": bool(low > 0 or high < 0)}
