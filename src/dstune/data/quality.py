"""Quality checks of the data stage: every dropped record is counted by reason, with its file:line.

Unreadable and malformed records are found while reading (see `readers` and `formats.RecordError`); this
module adds exact and near duplicates (MinHash LSH through `datasketch`), train/dev/test leakage and
over-long samples, and keeps the books: input = kept + sum of dropped, per split.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter, defaultdict

from ..errors import InputError

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_WORD = re.compile(r"\w+", re.UNICODE)


class DropLog:
    """Counts of dropped records by split and reason, with the first few file:line messages of each reason."""

    def __init__(self, strict: bool = False, examples_per_reason: int = 20):
        self.strict = strict
        self.examples_per_reason = examples_per_reason
        self.inputs: Counter = Counter()
        self.dropped: dict[str, Counter] = defaultdict(Counter)
        self.changed: dict[str, Counter] = defaultdict(Counter)
        self.added: dict[str, Counter] = defaultdict(Counter)
        self.examples: dict[str, list[str]] = defaultdict(list)

    def seen(self, split: str, count: int = 1) -> None:
        """Count input records of a split."""
        self.inputs[split] += count

    def drop(self, split: str, reason: str, location: str, detail: str, problem: bool = True) -> None:
        """Count one dropped record (or, for a problem in strict mode, stop with its location).

        `problem=False` is for drops by design (sampling caps), which strict mode allows.
        """
        message = f"{location}: {detail}"
        if self.strict and problem:
            raise InputError(f"{message} (data.quality.strict is on)")
        self.dropped[split][reason] += 1
        if len(self.examples[reason]) < self.examples_per_reason:
            self.examples[reason].append(message)

    def change(self, split: str, what: str) -> None:
        """Count a kept record that was changed (truncated, ...)."""
        self.changed[split][what] += 1

    def add(self, split: str, what: str, count: int = 1) -> None:
        """Count records made by the stage (augmented copies); they are not inputs."""
        self.added[split][what] += count

    def summary(self, written: dict[str, int]) -> dict:
        """Per split: input, kept, dropped by reason, added; checks that nothing went missing."""
        out = {}
        for split in sorted(set(self.inputs) | set(written)):
            dropped = dict(self.dropped.get(split, {}))
            added = dict(self.added.get(split, {}))
            kept = written.get(split, 0) - sum(added.values())
            if self.inputs[split] != kept + sum(dropped.values()):
                raise AssertionError(f"data books do not balance for {split}: {self.inputs[split]} in, "
                                     f"{kept} kept, {dropped} dropped")
            out[split] = {"input": self.inputs[split], "kept": kept, "dropped": dropped,
                          "changed": dict(self.changed.get(split, {}))}
            if added:
                out[split]["added"] = added
        return {"splits": out, "examples": dict(self.examples)}


def record_text(record: dict) -> str:
    """The text the duplicate and leakage checks compare: every turn's content."""
    return "\n".join(turn["content"] for turn in record["messages"])


def normalise(text: str) -> str:
    """Case-, width- and whitespace-insensitive form of a text (NFKC folds full-width characters)."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def exact_key(text: str) -> str:
    return hashlib.sha1(normalise(text).encode("utf-8")).hexdigest()


def shingles(text: str, n: int = 3) -> set[str]:
    """Word n-grams, or character n-grams for Chinese/Japanese/Korean text (no spaces between words)."""
    text = normalise(text)
    if _CJK.search(text):
        chars = "".join(text.split())
        return {chars[i:i + n] for i in range(max(1, len(chars) - n + 1))}
    words = _WORD.findall(text)
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


class NearDuplicateIndex:
    """MinHash LSH over shingles: finds an earlier text with estimated Jaccard similarity >= threshold."""

    def __init__(self, threshold: float, num_perm: int = 64):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.num_perm = num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.count = 0

    def signature(self, text: str):
        from datasketch import MinHash

        minhash = MinHash(num_perm=self.num_perm)
        minhash.update_batch([s.encode("utf-8") for s in shingles(text)])
        return minhash

    def query(self, signature) -> str | None:
        """The key of a near-duplicate already in the index, or None."""
        found = self.lsh.query(signature)
        return min(found) if found else None

    def add(self, key: str, signature) -> None:
        self.lsh.insert(key, signature)
        self.count += 1


def deduplicate(records: list[dict], split: str, log: DropLog, mode: str, threshold: float) -> list[dict]:
    """Drop later copies of a record (exact after normalisation; near by MinHash when mode is `near`)."""
    if mode == "none":
        return records
    exact: dict[str, str] = {}
    near = NearDuplicateIndex(threshold) if mode == "near" else None
    kept = []
    for record in records:
        text, where = record_text(record), record["meta"]["source"]
        key = exact_key(text)
        if key in exact:
            log.drop(split, "duplicate_exact", where, f"same text as {exact[key]}")
            continue
        if near is not None:
            signature = near.signature(text)
            match = near.query(signature)
            if match is not None:
                log.drop(split, "duplicate_near", where, f"near-duplicate of {match}")
                continue
            near.add(where, signature)
        exact[key] = where
        kept.append(record)
    return kept


def remove_leakage(splits: dict[str, list[dict]], log: DropLog, mode: str, threshold: float) -> None:
    """Drop training records that also appear, exactly or nearly, in dev or test; the eval splits stay fixed."""
    if mode == "none" or not splits.get("train"):
        return
    exact: dict[str, str] = {}
    near = NearDuplicateIndex(threshold) if mode == "near" else None
    for split in ("dev", "test"):
        for record in splits.get(split) or []:
            text, where = record_text(record), record["meta"]["source"]
            exact.setdefault(exact_key(text), where)
            if near is not None:
                near.add(where, near.signature(text))
    kept = []
    for record in splits["train"]:
        text, where = record_text(record), record["meta"]["source"]
        match = exact.get(exact_key(text))
        if match is not None:
            log.drop("train", "leak_exact", where, f"same text as eval record {match}")
            continue
        if near is not None:
            match = near.query(near.signature(text))
            if match is not None:
                log.drop("train", "leak_near", where, f"near-duplicate of eval record {match}")
                continue
        kept.append(record)
    splits["train"] = kept
