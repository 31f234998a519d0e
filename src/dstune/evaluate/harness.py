"""The evaluation stage: generate answers on a split and score them with registered metrics."""

from __future__ import annotations

import json
from pathlib import Path

from ..data.templates import ChatTemplate
from ..errors import InputError
from .generate import generate
from .metrics import METRICS


def record_tasks(records: list[dict]) -> list[str]:
    """The task of each record (from `meta.task`); multi-task models need one for every sample."""
    tasks = []
    for record in records:
        task = (record.get("meta") or {}).get("task")
        if task is None:
            raise InputError(f"sample {record['id']}: no task; multi-task prefixes need a \"task\" in every record")
        tasks.append(task)
    return tasks


def prompt_tokens(tokenizer, template: ChatTemplate, records: list[dict]) -> float:
    """The mean length in tokens of the prompts the model reads for these chat records."""
    texts = [template.prompt_text(r["messages"][:-1]) for r in records if "messages" in r]
    if not texts:
        return 0.0
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return round(sum(lengths) / len(lengths), 1)


def evaluate_records(model, tokenizer, template: ChatTemplate, records: list[dict], metrics: list[str],
                     batch_size: int = 32, max_new_tokens: int = 16, progress: str | None = None,
                     cache=None) -> dict:
    """Score the model's answers to the last assistant turn of each record (raw-text records have none)."""
    records = [r for r in records if "messages" in r]
    prompts = [r["messages"][:-1] for r in records]
    references = [r["messages"][-1]["content"] for r in records]
    tasks = record_tasks(records) if getattr(model, "prefix_tasks", None) else None
    result = generate(model, tokenizer, template, prompts, batch_size, max_new_tokens, progress, tasks, cache)
    scores = {name: METRICS[name](result.texts, references) for name in metrics}
    return {
        "metrics": scores,
        "samples": len(records),
        "generated_tokens": result.new_tokens,
        "seconds": round(result.seconds, 3),
        "cached": result.cached,
        "tokens_per_second": round(result.new_tokens / max(result.seconds, 1e-9), 2),
        # What each request costs: the prompt the model reads, and the time to answer (answers not from the cache).
        "prompt_tokens_mean": prompt_tokens(tokenizer, template, records),
        "seconds_per_answer": (round(result.seconds / (len(records) - result.cached), 4)
                               if len(records) > result.cached else None),
        "predictions": [
            {"id": r["id"], "input": r["messages"][-2]["content"] if len(r["messages"]) > 1 else "",
             "expected": ref, "got": got} for r, ref, got in zip(records, references, result.texts)
        ],
    }


def write_eval(result: dict, path: Path) -> None:
    """Save an evaluation result as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
