"""The k-shot in-context baseline: the model answers with k training examples as earlier chat turns.

Fine-tuning is worth its cost only where it beats prompting with a few examples, so `eval.few_shot: {k, select}`
scores a model (the base, by default in `dstune run`) with k demonstrations before each test question:

    system prompt (the record's own) | user: demo 1 | assistant: answer 1 | ... | user: the question

- The pool is the training split of the run (source records only: no augmented copies, no replay), less any
  record that the recipe's own leakage setting (`data.quality.leakage`, at least `exact`) finds in the evaluated
  records, and less any record with an evaluated record's id. Every removal is counted by reason.
- `random` draws k demonstrations per question from a generator seeded by (seed, the question's id), so a
  question's prompt does not depend on which other questions are evaluated, or in which order.
- `similar` takes the k nearest pool records by TF-IDF cosine similarity of the user turns (character 2-4 grams
  within words, which works for English and Chinese alike), the nearest last, closest to the question. Ties go to
  the earlier pool record.

k-shot pays at every request: the result records the mean prompt length in tokens and the time per answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from ..data.quality import TextIndex, record_text
from ..errors import InputError


def is_source_record(record: dict) -> bool:
    """A training record as the data source gave it: not an augmented copy, not general replay."""
    meta = record.get("meta") or {}
    return "augmented_from" not in meta and not meta.get("replay")


def user_text(record: dict) -> str:
    """The question of a chat record: its last user turn (what similarity compares)."""
    turns = [t["content"] for t in record["messages"][:-1] if t["role"] == "user"]
    return turns[-1] if turns else ""


@dataclass
class Pool:
    """The demonstrations a k-shot prompt may draw from, and the books of what was left out, by reason."""

    records: list[dict]
    source_records: int
    dropped: dict[str, int] = field(default_factory=dict)
    # Training records that are not source records (augmented copies, replay): never demonstrations.
    not_source: int = 0

    def books(self) -> dict:
        return {"source_records": self.source_records, "not_source": self.not_source, "kept": len(self.records),
                "dropped": dict(self.dropped)}


def demonstration_pool(train_records: list[dict], eval_records: list[dict], leakage: str = "near",
                       threshold: float = 0.8) -> Pool:
    """Source chat records of the training split that are not (near-)copies of an evaluated record."""
    chat = [r for r in train_records if "messages" in r]
    source = [r for r in chat if is_source_record(r)]
    dropped: dict[str, int] = {}
    eval_ids = {str(r["id"]) for r in eval_records}
    kept = []
    for record in source:
        if str(record["id"]) in eval_ids:
            dropped["same_id_as_eval"] = dropped.get("same_id_as_eval", 0) + 1
        else:
            kept.append(record)
    if kept and eval_records:
        # Never an evaluated record as a demonstration, whatever the recipe's leakage setting: exact at least.
        index = TextIndex("exact" if leakage == "none" else leakage, threshold)
        index.add([record_text(r) for r in eval_records], [str(r["id"]) for r in eval_records])
        hits = index.match([record_text(r) for r in kept], [str(r["id"]) for r in kept], add=False)
        survivors = []
        for record, hit in zip(kept, hits):
            if hit is None:
                survivors.append(record)
            else:
                reason = f"leakage_{hit[0]}"
                dropped[reason] = dropped.get(reason, 0) + 1
        kept = survivors
    return Pool(kept, len(source), dropped, len(chat) - len(source))


def random_demonstrations(pool_size: int, query_ids: list[str], k: int, seed: int) -> list[list[int]]:
    """k distinct pool indices per question, from a generator seeded by (seed, question id)."""
    return [random.Random(f"{seed}:{qid}").sample(range(pool_size), k) for qid in query_ids]


def similar_demonstrations(pool_texts: list[str], query_texts: list[str], k: int) -> list[list[int]]:
    """The k pool indices nearest each question by TF-IDF cosine similarity, the nearest last."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), lowercase=True)
    pool = vectorizer.fit_transform(pool_texts)  # rows are L2-normalised: a dot product is the cosine
    chosen = []
    for start in range(0, len(query_texts), 1024):
        similarity = (vectorizer.transform(query_texts[start:start + 1024]) @ pool.T).toarray()
        # A stable sort on -similarity: equal similarities keep pool order, so ties go to the earlier record.
        order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
        chosen += [list(reversed(row.tolist())) for row in order]
    return chosen


def check_pool_size(pool: Pool, k: int) -> None:
    """Refuse a k larger than the pool, naming the recipe key and what the pool left out."""
    if k > len(pool.records):
        raise InputError(f"eval.few_shot.k: {k} demonstrations wanted, but the pool has {len(pool.records)} "
                         f"training records ({pool.books()}); lower k")


def choose_demonstrations(pool: Pool, records: list[dict], k: int, select: str, seed: int) -> list[list[dict]]:
    """The demonstrations (pool records) for each evaluated record."""
    check_pool_size(pool, k)
    if select == "random":
        picks = random_demonstrations(len(pool.records), [str(r["id"]) for r in records], k, seed)
    else:
        picks = similar_demonstrations([user_text(r) for r in pool.records], [user_text(r) for r in records], k)
    return [[pool.records[i] for i in row] for row in picks]


def with_demonstrations(record: dict, demonstrations: list[dict]) -> dict:
    """The record with the demonstrations' turns (user, assistant) after its system prompt, before its question."""
    messages = record["messages"]
    system = [t for t in messages[:1] if t["role"] == "system"]
    shots = [t for demo in demonstrations for t in demo["messages"] if t["role"] != "system"]
    return {**record, "messages": system + shots + messages[len(system):]}


def few_shot_records(pool: Pool, records: list[dict], k: int, select: str, seed: int) -> tuple[list[dict], dict]:
    """The evaluated records as k-shot prompts, and {record id: [demonstration ids]}."""
    records = [r for r in records if "messages" in r]
    chosen = choose_demonstrations(pool, records, k, select, seed)
    shown = {str(r["id"]): [str(d["id"]) for d in demos] for r, demos in zip(records, chosen)}
    return [with_demonstrations(r, demos) for r, demos in zip(records, chosen)], shown


def label(options) -> str:
    """How a k-shot result is named in reports and file names: `5-shot random`."""
    return f"{options.k}-shot {options.select}"


def nearest_neighbour_answers(pool: Pool, records: list[dict]) -> list[str]:
    """A classifier with no language model: the answer of the most similar pool record (TF-IDF 1-NN)."""
    picks = similar_demonstrations([user_text(r) for r in pool.records], [user_text(r) for r in records], 1)
    return [pool.records[row[0]]["messages"][-1]["content"] for row in picks]
