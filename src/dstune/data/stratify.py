"""Stratified sampling for term coverage: every stratum (or term) keeps at least k examples where data allows."""

from __future__ import annotations

import random
import re
from collections import defaultdict
from typing import Callable

from ..errors import InputError
from .quality import DropLog, record_text

KeyFn = Callable[[dict], list[str]]


def field_key(path: str) -> KeyFn:
    """Strata from a record field such as `meta.category` (a list value gives several strata)."""
    parts = path.split(".")

    def key(record: dict) -> list[str]:
        node = record
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                return []
            node = node[part]
        return [str(v) for v in node] if isinstance(node, list) else [str(node)]

    return key


def term_key(terms: list[str]) -> KeyFn:
    """Strata are the listed terms found in the record's text (case-insensitive; whole words for ASCII terms)."""
    patterns = []
    for term in terms:
        escaped = re.escape(term)
        ascii_word = re.fullmatch(r"[\x00-\x7f]+", term) and re.match(r"\w", term)
        patterns.append((term, re.compile(rf"\b{escaped}\b" if ascii_word else escaped, re.IGNORECASE)))

    def key(record: dict) -> list[str]:
        text = record_text(record)
        return [term for term, pattern in patterns if pattern.search(text)]

    return key


def coverage(records: list[dict], key: KeyFn, wanted: list[str] | None = None) -> dict:
    """Strata covered by `records` out of those present (or wanted), and the ones left uncovered."""
    counts: dict[str, int] = defaultdict(int)
    for record in records:
        for stratum in key(record):
            counts[stratum] += 1
    universe = list(wanted) if wanted is not None else sorted(counts)
    covered = [s for s in universe if counts.get(s)]
    return {"strata": len(universe), "covered": len(covered),
            "coverage": round(len(covered) / len(universe), 4) if universe else 1.0,
            "uncovered": [s for s in universe if not counts.get(s)], "min_count": min(
                (counts.get(s, 0) for s in universe), default=0)}


def stratified_sample(records: list[dict], key: KeyFn, target: int, min_per_stratum: int,
                      rng: random.Random) -> list[dict]:
    """`target` records in which every stratum has `min_per_stratum` examples where the data allows.

    Rounds go over the strata, rarest first, taking one new record per stratum per round, so that a small
    budget still covers as many strata as it can; the rest of the budget is filled at random.
    """
    by_stratum: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        for stratum in key(record):
            by_stratum[stratum].append(index)
    for members in by_stratum.values():
        rng.shuffle(members)
    chosen: list[int] = []
    taken: set[int] = set()
    have: dict[str, int] = defaultdict(int)
    order = sorted(by_stratum, key=lambda s: (len(by_stratum[s]), s))
    for _ in range(min_per_stratum):
        for stratum in order:
            if len(chosen) >= target or have[stratum] >= min_per_stratum:
                continue
            pick = next((i for i in by_stratum[stratum] if i not in taken), None)
            if pick is None:
                continue
            chosen.append(pick)
            taken.add(pick)
            for s in key(records[pick]):  # a record can cover several terms at once
                have[s] += 1
    rest = [i for i in range(len(records)) if i not in taken]
    rng.shuffle(rest)
    chosen += rest[: max(0, target - len(chosen))]
    return [records[i] for i in sorted(chosen)]


def stratify_train(splits: dict[str, list[dict]], options, log: DropLog, seed: int) -> dict | None:
    """Sample the training split to `options.target` (if set) and report coverage of the strata."""
    if not options.key and not options.terms:
        if options.target is not None:
            raise InputError("data.stratify.target: set data.stratify.key or data.stratify.terms to sample by")
        return None
    key = term_key(options.terms) if options.terms else field_key(options.key)
    records = splits["train"]
    wanted = list(options.terms) if options.terms else None
    before = coverage(records, key, wanted)
    if options.target is not None and options.target < len(records):
        sampled = stratified_sample(records, key, options.target, options.min_per_stratum, random.Random(seed))
        kept_ids = {id(r) for r in sampled}
        for record in records:
            if id(record) not in kept_ids:
                log.drop("train", "not_sampled", record["meta"].get("source", record["id"]),
                         f"over data.stratify.target={options.target}", problem=False)
        splits["train"] = sampled
    report = {"by": options.key or "terms", "target": options.target, "min_per_stratum": options.min_per_stratum,
              "input": before, "train": coverage(splits["train"], key, wanted)}
    # Strata of the eval splits that training never shows (with a field key; terms are listed already).
    for split in ("dev", "test"):
        if splits.get(split) and not options.terms:
            eval_strata = sorted({s for r in splits[split] for s in key(r)})
            report[f"{split}_strata_in_train"] = coverage(splits["train"], key, eval_strata)
    return report
