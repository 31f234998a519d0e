"""Tier 1, general capability kept: accuracy (contains_answer by default) on a general instruction set, and
perplexity on general text.

Both ship with dstune (src/dstune/data/general/, written by its developers, Apache-2.0) or come from local files.
Retention is tuned / base for accuracy and base / tuned for perplexity (lower is better), so 1.0 means nothing
was lost; the recipe's gate fails the run (exit code 3) below `eval.general.min_retention`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..data.build import GENERAL_DIR, GENERAL_SET
from ..data.formats import read_samples
from ..data.templates import ChatTemplate



def general_records(path: str | None, max_samples: int | None) -> list[dict]:
    """The general instruction records: a local file or folder, or the shipped set (every n-th, if capped)."""
    records = list(read_samples(path or GENERAL_SET))
    if max_samples is not None and len(records) > max_samples:
        step = len(records) / max_samples  # an even spread over categories and languages, not the first n
        records = [records[int(i * step)] for i in range(max_samples)]
    return records


@torch.no_grad()
def perplexity(model, tokenizer, text: str, window: int = 256) -> dict:
    """Token perplexity of a text, in non-overlapping windows (each window starts fresh)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window].unsqueeze(0).to(model.device)
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
            nll += float(loss)
            count += chunk.shape[1] - 1
    finally:
        model.train(was_training)
    return {"perplexity": math.exp(nll / max(1, count)), "tokens": count}


def general_eval(model, tokenizer, template: ChatTemplate, options, batch_size: int, progress: str | None = None,
                 cache=None) -> dict:
    """Tier-1 figures of one model: general exact match (with its predictions) and perplexity."""
    from .harness import evaluate_records

    records = general_records(options.file, options.max_samples)
    result = evaluate_records(model, tokenizer, template, records, [options.metric], batch_size,
                              options.max_new_tokens, progress, cache)
    text_path = Path(options.text_file) if options.text_file else GENERAL_DIR / "general_text.txt"
    ppl = perplexity(model, tokenizer, text_path.read_text(encoding="utf-8"))
    return {"accuracy": result["metrics"][options.metric], "metric": options.metric, "samples": result["samples"],
            "perplexity": round(ppl["perplexity"], 4), "perplexity_tokens": ppl["tokens"],
            "predictions": result["predictions"]}


def retention(base: dict, tuned: dict, min_retention: float | None) -> dict:
    """Tuned vs base: accuracy retention, perplexity retention, and the gate's verdict."""
    accuracy = tuned["accuracy"] / base["accuracy"] if base["accuracy"] > 0 else None
    ppl = base["perplexity"] / tuned["perplexity"] if tuned["perplexity"] > 0 else None
    worst = min((r for r in (accuracy, ppl) if r is not None), default=None)
    passed = None if min_retention is None or worst is None else worst >= min_retention
    return {"accuracy": None if accuracy is None else round(accuracy, 4),
            "perplexity": None if ppl is None else round(ppl, 4), "worst": None if worst is None else round(worst, 4),
            "min_retention": min_retention, "passed": passed}
