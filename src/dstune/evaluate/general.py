"""Tier 1, general capability kept: accuracy (contains_answer by default) on general questions and perplexity on
general text, each with a bootstrap 95% CI.

Both ship with dstune (src/dstune/data/general/, written by its developers, Apache-2.0) or come from local files. The
shipped tier-1 data is the held-out part, which shares nothing with the replay / anchor part that training may read.
Retention is tuned / base for accuracy and base / tuned for perplexity (lower is better), so 1.0 means nothing
was lost; the recipe's gate fails the run (exit code 3) when a retention's point estimate falls below
`eval.general.min_retention`. The CIs are reported beside it, not gated on.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..data.build import GENERAL_TEST, GENERAL_TEST_TEXT
from ..data.formats import read_samples
from ..data.templates import ChatTemplate
from .metrics import METRICS
from .stats import bootstrap_ci, perplexity_ci, perplexity_ratio_ci, ratio_ci


def general_records(path: str | None, max_samples: int | None) -> list[dict]:
    """The general instruction records: a local file or folder, or the shipped held-out set (every n-th, if capped)."""
    records = list(read_samples(path or GENERAL_TEST))
    if max_samples is not None and len(records) > max_samples:
        step = len(records) / max_samples  # an even spread over categories and languages, not the first n
        records = [records[int(i * step)] for i in range(max_samples)]
    return records


@torch.no_grad()
def perplexity(model, tokenizer, text: str, window: int = 256) -> dict:
    """Token perplexity of a text, in non-overlapping windows (each window starts fresh), and each window's NLL sum."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    was_training = model.training
    model.eval()
    windows = []
    try:
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window].unsqueeze(0).to(model.device)
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
            windows.append([float(loss), chunk.shape[1] - 1])
    finally:
        model.train(was_training)
    nll, count = sum(w[0] for w in windows), sum(w[1] for w in windows)
    return {"perplexity": math.exp(nll / max(1, count)), "tokens": count, "windows": windows}


def general_eval(model, tokenizer, template: ChatTemplate, options, batch_size: int, progress: str | None = None,
                 cache=None, bootstrap_samples: int = 0) -> dict:
    """Tier-1 figures of one model: general accuracy (with its predictions) and perplexity, with 95% CIs."""
    from .harness import evaluate_records

    records = general_records(options.file, options.max_samples)
    result = evaluate_records(model, tokenizer, template, records, [options.metric], batch_size,
                              options.max_new_tokens, progress, cache)
    text_path = Path(options.text_file) if options.text_file else GENERAL_TEST_TEXT
    ppl = perplexity(model, tokenizer, text_path.read_text(encoding="utf-8"))
    out = {"accuracy": result["metrics"][options.metric], "metric": options.metric, "samples": result["samples"],
           "perplexity": round(ppl["perplexity"], 4), "perplexity_tokens": ppl["tokens"],
           "perplexity_windows": ppl["windows"], "predictions": result["predictions"]}
    if bootstrap_samples:
        got = [p["got"] for p in result["predictions"]]
        expected = [p["expected"] for p in result["predictions"]]
        accuracy = bootstrap_ci(METRICS[options.metric], got, expected, bootstrap_samples)
        out["accuracy_ci"] = [accuracy["low"], accuracy["high"]]
        if ppl["windows"]:
            interval = perplexity_ci(ppl["windows"], bootstrap_samples)
            out["perplexity_ci"] = [round(interval["low"], 4), round(interval["high"], 4)]
    return out


def retention(base: dict, tuned: dict, min_retention: float | None, bootstrap_samples: int = 0) -> dict:
    """Tuned vs base: accuracy and perplexity retention (with paired bootstrap CIs), and the gate's verdict.

    The gate reads the point estimates; the CIs say how sure they are.
    """
    accuracy = tuned["accuracy"] / base["accuracy"] if base["accuracy"] > 0 else None
    ppl = base["perplexity"] / tuned["perplexity"] if tuned["perplexity"] > 0 else None
    worst = min((r for r in (accuracy, ppl) if r is not None), default=None)
    passed = None if min_retention is None or worst is None else worst >= min_retention
    out = {"accuracy": None if accuracy is None else round(accuracy, 4),
           "perplexity": None if ppl is None else round(ppl, 4), "worst": None if worst is None else round(worst, 4),
           "min_retention": min_retention, "passed": passed}
    if bootstrap_samples:
        out.update(retention_cis(base, tuned, bootstrap_samples))
    return out


def retention_cis(base: dict, tuned: dict, samples: int) -> dict:
    """Paired bootstrap 95% CIs of the retentions, where both models answered the same questions and text."""
    out = {}
    a, b = base.get("predictions"), tuned.get("predictions")
    if a and b and [p["id"] for p in a] == [p["id"] for p in b]:
        interval = ratio_ci(METRICS[base["metric"]], [p["got"] for p in a], [p["got"] for p in b],
                            [p["expected"] for p in a], samples)
        if interval:
            out["accuracy_ci"] = [round(interval["low"], 4), round(interval["high"], 4)]
    a, b = base.get("perplexity_windows"), tuned.get("perplexity_windows")
    if a and b and [w[1] for w in a] == [w[1] for w in b]:
        interval = perplexity_ratio_ci(a, b, samples)
        out["perplexity_ci"] = [round(interval["low"], 4), round(interval["high"], 4)]
    return out
