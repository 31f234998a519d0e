"""Batched greedy generation with left padding, for evaluation and chat."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data.templates import ChatTemplate
from ..errors import phase


@dataclass
class Generations:
    """Answers in input order, with throughput figures."""

    texts: list[str]
    new_tokens: int
    seconds: float
    # Answers read from the generation cache (not counted in new_tokens or seconds).
    cached: int = 0


def stop_token_ids(tokenizer, template: ChatTemplate) -> list[int]:
    """Token ids that end an answer: the template's end of turn and the tokenizer's EOS."""
    ids = {tokenizer.eos_token_id}
    eot = tokenizer.encode(template.end_of_turn, add_special_tokens=False)
    if len(eot) == 1:
        ids.add(eot[0])
    return sorted(i for i in ids if i is not None)


@phase("generating answers")
@torch.no_grad()
def generate(model, tokenizer, template: ChatTemplate, conversations: list[list[dict]], batch_size: int = 32,
             max_new_tokens: int = 64, progress: str | None = None, tasks: list[str] | None = None,
             cache=None) -> Generations:
    """Greedy answers to each conversation's next assistant turn (`tasks`: each one's task, for task prefixes).

    With a `GenerationCache`, answers this model already gave to the same prompt and settings are reused.
    """
    was_training = model.training
    model.eval()
    prompts = [template.prompt_text(c) for c in conversations]
    texts: list[str] = [""] * len(prompts)
    stops = stop_token_ids(tokenizer, template)
    todo, keys = list(range(len(prompts))), []
    if cache is not None:
        from .cache import model_fingerprint

        fingerprint = model_fingerprint(model)
        settings = {"max_new_tokens": max_new_tokens, "greedy": True, "stops": stops}
        keys = [cache.key(fingerprint, p, {**settings, "task": tasks[i] if tasks else None})
                for i, p in enumerate(prompts)]
        found = cache.get_many(keys)
        for i, key in enumerate(keys):
            if key in found:
                texts[i] = found[key][0]
        todo = [i for i, key in enumerate(keys) if key not in found]
    generated_tokens: dict[int, int] = {}
    # Sorting by length keeps left padding small; answers are put back in input order.
    order = sorted(todo, key=lambda i: len(prompts[i]))
    new_tokens, start = 0, time.perf_counter()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batches = range(0, len(order), batch_size)
        for first in tqdm(batches, desc=progress, disable=progress is None, leave=False):
            index = order[first:first + batch_size]
            batch = tokenizer([prompts[i] for i in index], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            with model.for_task([tasks[i] for i in index]) if tasks else contextlib.nullcontext():
                output = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                    pad_token_id=tokenizer.pad_token_id,
                )
            answers = output[:, batch["input_ids"].shape[1]:]
            for i, row in zip(index, answers):
                keep = []
                for token in row.tolist():
                    if token in stops:
                        break
                    keep.append(token)
                new_tokens += len(keep) + 1
                generated_tokens[i] = len(keep) + 1
                texts[i] = tokenizer.decode(keep, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    seconds = time.perf_counter() - start
    if cache is not None and order:
        cache.put_many([(keys[i], texts[i], generated_tokens[i]) for i in order])
    return Generations(texts, new_tokens, seconds, len(prompts) - len(order))
