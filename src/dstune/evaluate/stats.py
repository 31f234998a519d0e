"""Bootstrap statistics: confidence intervals of metric scores and perplexity, paired comparisons and ratios."""

from __future__ import annotations

import numpy as np

from .metrics import MetricFn


def _resample(n: int, samples: int, seed: int) -> np.ndarray:
    """Bootstrap indices, one resample of the n items per row: shape (samples, n)."""
    return np.random.RandomState(seed).randint(0, n, size=(samples, n))


def _scores(metric: MetricFn, predictions: list[str], references: list[str], rows: np.ndarray) -> np.ndarray:
    """The metric on every resample (metrics take lists, so this loop cannot be vectorised)."""
    return np.array([metric([predictions[i] for i in row], [references[i] for i in row]) for row in rows])


def _interval(value: float, draws: np.ndarray, samples: int, alpha: float) -> dict:
    """The percentile interval of the finite draws around a point estimate: value, low, high, samples."""
    draws = draws[np.isfinite(draws)]
    low, high = np.percentile(draws, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if len(draws) else (value, value)
    # The percentile interval of a skewed statistic on a tiny set can miss the point estimate; widen it to keep it.
    return {"value": value, "low": min(float(low), value), "high": max(float(high), value), "samples": samples}


def bootstrap_ci(metric: MetricFn, predictions: list[str], references: list[str], samples: int = 1000,
                 seed: int = 0, alpha: float = 0.05) -> dict:
    """The metric with a percentile bootstrap (1 - alpha) confidence interval: value, low, high, samples."""
    value = float(metric(predictions, references))
    scores = _scores(metric, predictions, references, _resample(len(references), samples, seed))
    return _interval(value, scores, samples, alpha)


def ratio_ci(metric: MetricFn, predictions_a: list[str], predictions_b: list[str], references: list[str],
             samples: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict | None:
    """b's score / a's, both on the same resamples (retention: tuned / base); None when a scores 0."""
    a = float(metric(predictions_a, references))
    if a <= 0:
        return None
    rows = _resample(len(references), samples, seed)
    with np.errstate(divide="ignore", invalid="ignore"):  # a resample where a scores 0 has no ratio: dropped
        draws = _scores(metric, predictions_b, references, rows) / _scores(metric, predictions_a, references, rows)
    return _interval(float(metric(predictions_b, references)) / a, draws, samples, alpha)


def _perplexities(windows: list[list[float]], rows: np.ndarray) -> np.ndarray:
    """exp(NLL / tokens) of each resample of the windows ([NLL sum, token count] each)."""
    nll, tokens = np.asarray(windows, dtype=np.float64).T
    return np.exp(nll[rows].sum(axis=1) / np.maximum(tokens[rows].sum(axis=1), 1))


def perplexity_ci(windows: list[list[float]], samples: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Perplexity over windows ([NLL sum, token count] each) with a bootstrap CI that resamples whole windows."""
    value = float(_perplexities(windows, np.arange(len(windows))[None])[0])
    return _interval(value, _perplexities(windows, _resample(len(windows), samples, seed)), samples, alpha)


def perplexity_ratio_ci(windows_a: list[list[float]], windows_b: list[list[float]], samples: int = 1000,
                        seed: int = 0, alpha: float = 0.05) -> dict:
    """a's perplexity / b's (retention: base / tuned) on the same resamples of the same text's windows."""
    every = np.arange(len(windows_a))[None]
    value = float(_perplexities(windows_a, every)[0] / _perplexities(windows_b, every)[0])
    rows = _resample(len(windows_a), samples, seed)
    return _interval(value, _perplexities(windows_a, rows) / _perplexities(windows_b, rows), samples, alpha)


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
