"""Quality checks of the data stage: every dropped record is counted by reason, with its file:line.

Unreadable and malformed records are found while reading (see `readers` and `formats.RecordError`). This module
adds over-long samples, exact and near duplicates and train/dev/test leakage, and keeps the books: input = kept +
sum of dropped, per split. The checks stream: records pass in chunks and only compact keys stay in memory
(about 500 bytes per kept record with near duplicates on), so a million records are checked in under 1 GB
(see docs/data.md).
"""

from __future__ import annotations

import hashlib
import heapq
import re
import unicodedata
import zlib
from collections import Counter, defaultdict
from functools import lru_cache
from itertools import islice
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import InputError

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_WORD = re.compile(r"\w+", re.UNICODE)
CHUNK = 4096
EVAL_SPLITS = ("dev", "test")


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
        # Per split, the kept pairs most alike below the near-duplicate threshold (TextIndex.closest_pairs).
        self.closest: dict[str, list[dict]] = {}

    def seen(self, split: str, count: int = 1) -> None:
        """Count input records of a split."""
        self.inputs[split] += count

    def drop(self, split: str, reason: str, location: str, detail: str, problem: bool = True) -> None:
        """Count one dropped record (or, for a problem in strict mode, stop with its location).

        `problem=False` is for drops by design (sampling caps, domain filtering), which strict mode allows.
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
        """Count records made or mixed in by the stage (augmented copies, replay); they are not inputs."""
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
        return {"splits": out, "examples": dict(self.examples),
                **({"closest_pairs": self.closest} if any(self.closest.values()) else {})}


def record_text(record: dict) -> str:
    """The text the duplicate, leakage and domain checks compare: a raw text, or every turn's content."""
    if "text" in record:
        return record["text"]
    return "\n".join(turn["content"] for turn in record["messages"])


def where(record: dict) -> str:
    """The record's location (file:line) for messages."""
    return record["meta"].get("source", record["id"])


def normalise(text: str) -> str:
    """Case-, width- and whitespace-insensitive form of a text (NFKC folds full-width characters)."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def shingles(text: str, n: int = 3) -> set[str]:
    """Word n-grams, or character n-grams for Chinese/Japanese/Korean text (no spaces between words)."""
    text = normalise(text)
    if _CJK.search(text):
        chars = "".join(text.split())
        return {chars[i:i + n] for i in range(max(1, len(chars) - n + 1))}
    words = _WORD.findall(text)
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


@lru_cache(maxsize=None)  # every split's index asks for the same bands
def lsh_bands(threshold: float, num_perm: int, false_negative_weight: float = 0.9) -> tuple[int, int]:
    """Bands b and rows r (b * r <= num_perm) that minimise the weighted false positives and negatives.

    Candidates are verified against their signatures, so false positives only cost time: the weight favours
    recall (datasketch's even weights find only ~40% of the pairs at exactly the threshold).
    """
    grid = np.linspace(0.0, 1.0, 401)
    below, above = grid <= threshold, grid >= threshold
    best, best_error = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            collide = 1.0 - (1.0 - grid ** r) ** b
            error = ((1 - false_negative_weight) * np.trapezoid(collide[below], grid[below])
                     + false_negative_weight * np.trapezoid(1.0 - collide[above], grid[above]))
            if error < best_error:
                best, best_error = (b, r), error
    return best


_SHIFT = np.uint64(32)


class MinHasher:
    """MinHash signatures of a batch of texts at once (numpy), with one set of permutations for all.

    datasketch's per-record MinHash and its LSH index ran at 2,600 records/s and held ~2.5 KB per record; batching
    the permutations over all shingles of a chunk, and keeping band keys in sorted arrays, is what lets a
    million records through on a laptop (docs/data.md).
    """

    def __init__(self, num_perm: int = 64, seed: int = 1):
        rng = np.random.RandomState(seed)
        # Multiply-shift hashing (Dietzfelbinger): odd a, any b, keep the top 32 bits of a*x + b mod 2^64.
        self.a = rng.randint(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.randint(0, 1 << 63, size=num_perm, dtype=np.uint64)
        self.num_perm = num_perm

    def signatures(self, texts: list[str], max_cells: int = 1 << 20) -> np.ndarray:
        """(len(texts), num_perm) uint64 signatures of the texts' shingle sets."""
        sets = [shingles(t) for t in texts]
        sizes = np.fromiter((len(x) for x in sets), dtype=np.int64, count=len(sets))
        flat = np.fromiter((zlib.crc32(s.encode("utf-8")) for x in sets for s in x), dtype=np.uint64,
                           count=int(sizes.sum()))
        ends = np.cumsum(sizes)
        out = np.empty((len(texts), self.num_perm), dtype=np.uint64)
        start = 0
        while start < len(texts):  # slices of about max_cells shingle x permutation values
            first = ends[start] - sizes[start]
            stop = max(start + 1, int(np.searchsorted(ends, first + max_cells // self.num_perm, side="right")))
            with np.errstate(over="ignore"):  # arithmetic mod 2^64 is the point
                permuted = (flat[first:ends[stop - 1], None] * self.a + self.b) >> _SHIFT
            out[start:stop] = np.minimum.reduceat(permuted, ends[start:stop] - sizes[start:stop] - first, axis=0)
            start = stop
        return out


class SortedKeys:
    """uint64 keys in a sorted array with the ordinal of the record each came from; grows chunk by chunk."""

    def __init__(self):
        self.keys = np.empty(0, dtype=np.uint64)
        self.ordinals = np.empty(0, dtype=np.int32)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The ordinal stored for each key, or -1."""
        if not len(self.keys):
            return np.full(len(keys), -1, dtype=np.int32)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, self.ordinals[pos], -1)

    def insert(self, keys: np.ndarray, ordinals: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")
        keys, ordinals = keys[order], ordinals[order]
        pos = np.searchsorted(self.keys, keys, side="right")  # after equal keys: lookups find the first record
        self.keys = np.insert(self.keys, pos, keys)
        self.ordinals = np.insert(self.ordinals, pos, ordinals)


def exact_keys(texts: list[str]) -> np.ndarray:
    """64-bit keys of the normalised texts."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(normalise(t).encode("utf-8"), digest_size=8).digest(), "little")
                        for t in texts), dtype=np.uint64, count=len(texts))


# Near misses: 16 bands of 4 signature values find a pair at Jaccard 0.67 with probability 0.96, at 0.5 with 0.64;
# 192 more bytes per kept record. The closest few pairs below the threshold go to the data report.
MISS_BANDS, MISS_ROWS, CLOSEST_PAIRS = 16, 4, 10


class TextIndex:
    """Exact (normalised text) and, in mode `near`, MinHash LSH keys of the texts added so far, with locations.

    Near candidates from the LSH bands are verified: the share of equal signature values (an estimate of the
    Jaccard similarity of the shingle sets) must reach the threshold. Kept texts are also probed with coarser
    bands for their closest earlier text below the threshold: `closest_pairs` shows what was almost flagged.
    """

    def __init__(self, mode: str, threshold: float, num_perm: int = 128):
        self.mode = mode
        self.threshold = threshold
        self.exact = SortedKeys()
        self.locations: list[str] = []
        self._closest: list[tuple[float, str, str]] = []  # a min-heap of (similarity, location, earlier location)
        if mode == "near":
            self.hasher = MinHasher(num_perm)
            self.bands, self.rows = lsh_bands(threshold, num_perm)
            self.near = [SortedKeys() for _ in range(self.bands)]
            self.miss = [SortedKeys() for _ in range(MISS_BANDS)]
            # The low 16 bits of each value suffice to compare signatures (a chance match is 1 in 65,536).
            # Rows [0, count) are in use; the buffer doubles when full, so appending is amortised O(1).
            self._signatures = np.empty((CHUNK, num_perm), dtype=np.uint16)

    @property
    def signatures(self) -> np.ndarray:
        return self._signatures[: len(self.locations)]

    def keys(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Exact keys (n,), band keys (n, bands) and 16-bit signatures (n, num_perm) of the texts."""
        if self.mode != "near":
            return exact_keys(texts), None, None
        full = self.hasher.signatures(texts)
        sig = full[:, : self.bands * self.rows].reshape(len(texts), self.bands, self.rows)
        band = np.zeros((len(texts), self.bands), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for row in range(self.rows):  # FNV-style mixing of the band's rows into one 64-bit key
                band = (band * np.uint64(0x100000001B3)) ^ sig[:, :, row]
        return exact_keys(texts), band, full.astype(np.uint16)

    def add(self, texts: list[str], locations: list[str], keys=None) -> None:
        """Index texts without checking them (the eval splits, for the leakage check)."""
        self._insert(*(keys or self.keys(texts)), np.arange(len(texts)), locations)

    def closest_pairs(self) -> list[dict]:
        """The kept pairs most alike below the threshold, most similar first: {similarity, record, closest to}."""
        return [{"similarity": round(sim, 3), "record": here, "closest_to": there}
                for sim, here, there in sorted(self._closest, reverse=True)]

    def _probe_misses(self, sigs: np.ndarray, locations: list[str]) -> np.ndarray:
        """Note each new text's closest earlier text below the threshold; returns the texts' miss-band keys."""
        values = sigs[:, -MISS_BANDS * MISS_ROWS:].astype(np.uint64).reshape(len(sigs), MISS_BANDS, MISS_ROWS)
        keys = np.zeros((len(sigs), MISS_BANDS), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for row in range(MISS_ROWS):
                keys = (keys * np.uint64(0x100000001B3)) ^ values[:, :, row]
        indexed = np.stack([band.lookup(keys[:, j]) for j, band in enumerate(self.miss)], axis=1).tolist()
        seen: list[dict[int, int]] = [{} for _ in range(MISS_BANDS)]
        for i, row_keys in enumerate(keys.tolist()):
            earlier = {o for o in indexed[i] if o >= 0}  # ordinals of texts indexed before this batch
            batch = {b[k] for b, k in zip(seen, row_keys) if k in b}  # texts of this batch before this one
            for b, k in zip(seen, row_keys):
                b.setdefault(k, i)
            found = [(float((self.signatures[o] == sigs[i]).mean()), self.locations[o]) for o in earlier]
            found += [(float((sigs[m] == sigs[i]).mean()), locations[m]) for m in batch]
            found = [f for f in found if f[0] < self.threshold]
            if found:
                similarity, other = max(found)
                item = (similarity, locations[i], other)
                if len(self._closest) < CLOSEST_PAIRS:
                    heapq.heappush(self._closest, item)
                elif item > self._closest[0]:
                    heapq.heapreplace(self._closest, item)
        return keys

    def _insert(self, exact, band, sigs, rows, locations: list[str]) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        start = len(self.locations)
        ordinals = np.arange(start, start + len(rows), dtype=np.int32)
        self.exact.insert(exact[rows], ordinals)
        if band is not None:
            for j, keys in enumerate(self.near):
                keys.insert(band[rows, j], ordinals)
            misses = self._probe_misses(sigs[rows], locations)
            for j, keys in enumerate(self.miss):
                keys.insert(misses[:, j], ordinals)
            if start + len(rows) > len(self._signatures):
                grown = np.empty((max(2 * len(self._signatures), start + len(rows)), self.hasher.num_perm),
                                 dtype=np.uint16)
                grown[:start] = self._signatures[:start]
                self._signatures = grown
            self._signatures[start:start + len(rows)] = sigs[rows]
        self.locations += locations

    def match(self, texts: list[str], locations: list[str], add: bool, keys=None) -> list[tuple[str, str] | None]:
        """("exact" or "near", location of the earlier text) or None per text.

        With `add`, texts without a match join the index, so later texts of the same batch are checked
        against them too (the first copy is kept, as it would be one record at a time). `keys` are the texts'
        `keys()` when the caller has them already (an index of the same mode and threshold made them).
        """
        exact, band, sigs = keys or self.keys(texts)
        found_exact = self.exact.lookup(exact).tolist()
        found_near = self._indexed_near(band, sigs).tolist() if band is not None else [-1] * len(texts)
        exact_list = exact.tolist()
        band_list = band.tolist() if band is not None else None
        batch_exact: dict[int, int] = {}
        batch_bands: list[dict[int, int]] = [{} for _ in range(self.bands if band is not None else 0)]
        results, fresh = [], []
        for i in range(len(texts)):
            hit = None
            if found_exact[i] >= 0:
                hit = ("exact", self.locations[found_exact[i]])
            elif exact_list[i] in batch_exact:
                hit = ("exact", locations[batch_exact[exact_list[i]]])
            elif found_near[i] >= 0:
                hit = ("near", self.locations[found_near[i]])
            elif band_list is not None:
                batch = sorted({b[k] for b, k in zip(batch_bands, band_list[i]) if k in b})
                if batch and (similar := self._similar(sigs[i], sigs[batch])) is not None:
                    hit = ("near", locations[batch[similar]])
            results.append(hit)
            if hit is None and add:
                fresh.append(i)
                batch_exact[exact_list[i]] = i
                if band_list is not None:
                    for b, k in zip(batch_bands, band_list[i]):
                        b.setdefault(k, i)
        if add and fresh:
            self._insert(exact, band, sigs, fresh, [locations[i] for i in fresh])
        return results

    def _indexed_near(self, band: np.ndarray, sigs: np.ndarray) -> np.ndarray:
        """Per text, the earliest indexed text that shares a band and passes verification, or -1."""
        best = np.full(len(band), np.iinfo(np.int32).max, dtype=np.int64)
        for j, keys in enumerate(self.near):
            candidate = keys.lookup(band[:, j])
            rows = np.flatnonzero(candidate >= 0)
            if not len(rows):
                continue
            similarity = (self.signatures[candidate[rows]] == sigs[rows]).mean(axis=1)
            passing = rows[similarity >= self.threshold]
            best[passing] = np.minimum(best[passing], candidate[passing])
        return np.where(best == np.iinfo(np.int32).max, -1, best)

    def _similar(self, signature: np.ndarray, candidates: np.ndarray) -> int | None:
        """Index of the first candidate whose estimated Jaccard similarity reaches the threshold, or None."""
        similarity = (candidates == signature).mean(axis=1)
        passing = np.flatnonzero(similarity >= self.threshold)
        return int(passing[0]) if len(passing) else None


def chunked(records: Iterable[dict], size: int = CHUNK) -> Iterator[list[dict]]:
    """Lists of up to `size` records."""
    iterator = iter(records)
    while chunk := list(islice(iterator, size)):
        yield chunk


LengthFn = Callable[[list[dict]], list[int]]


class QualityChecks:
    """The per-record checks, run on each split as a stream: over-length, duplicates, then leakage.

    Run the eval splits first: their kept records make the index that training records are checked against.
    """

    def __init__(self, options, log: DropLog, lengths: LengthFn | None, max_length: int):
        self.options = options
        self.log = log
        self.lengths = lengths
        self.max_length = max_length
        self.eval_index = TextIndex(options.leakage, options.near_threshold) if options.leakage != "none" else None

    def run(self, split: str, records: Iterable[dict]) -> Iterator[dict]:
        """The records of one split that pass every check; the others are counted in the log."""
        options = self.options
        dedup = TextIndex(options.dedup, options.near_threshold) if options.dedup != "none" else None
        for chunk in chunked(records):
            chunk = self.check_lengths(split, chunk)
            if not chunk:
                continue
            texts, places = [record_text(r) for r in chunk], [where(r) for r in chunk]
            # One set of keys serves both indexes when they compare the same way.
            keys = dedup.keys(texts) if dedup is not None else None
            shared = keys if dedup is not None and options.dedup == options.leakage else None
            if dedup is not None:
                hits = dedup.match(texts, places, add=True, keys=keys)
                kept = [i for i, hit in enumerate(hits) if hit is None]
                self._drop_hits(split, chunk, hits, "duplicate", "same text as {}", "near-duplicate of {}")
                chunk, texts, places = [chunk[i] for i in kept], [texts[i] for i in kept], [places[i] for i in kept]
                shared = None if shared is None else tuple(None if k is None else k[kept] for k in shared)
            if self.eval_index is not None and chunk:
                if split in EVAL_SPLITS:
                    self.eval_index.add(texts, places, keys=shared)
                else:
                    hits = self.eval_index.match(texts, places, add=False, keys=shared)
                    chunk = self._drop_hits(split, chunk, hits, "leak", "same text as eval record {}",
                                            "near-duplicate of eval record {}")
            yield from chunk
        if dedup is not None and dedup.mode == "near":
            self.log.closest[split] = dedup.closest_pairs()

    def _drop_hits(self, split, chunk, hits, reason, exact_message, near_message) -> list[dict]:
        kept = []
        for record, hit in zip(chunk, hits):
            if hit is None:
                kept.append(record)
            else:
                kind, other = hit
                message = exact_message if kind == "exact" else near_message
                self.log.drop(split, f"{reason}_{kind}", where(record), message.format(other))
        return kept

    def check_lengths(self, split: str, chunk: list[dict]) -> list[dict]:
        """Drop, count as truncated, or refuse samples over max_length tokens; kept ones get meta.tokens."""
        if self.lengths is None:
            return chunk
        kept = []
        for record, length in zip(chunk, self.lengths(chunk)):
            record["meta"]["tokens"] = length
            if length <= self.max_length:
                kept.append(record)
            elif self.options.overlong == "raise":
                raise InputError(f"{where(record)}: {length} tokens, over data.max_length={self.max_length} "
                                 "(data.quality.overlong=raise)")
            elif self.options.overlong == "truncate":
                self.log.change(split, "truncated")
                kept.append(record)
            else:
                self.log.drop(split, "over_length", where(record), f"{length} tokens > data.max_length={self.max_length}")
        return kept
