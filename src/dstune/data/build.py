"""The data stage: build the domain dataset folder (train/dev/test JSONL, a manifest and the data report).

Two passes. The checks stream every split through the per-record quality checks into its JSONL file, eval splits
first (training records are checked for leaks against them). The selection then works on the training split:
domain filter (adversarial validation), stratified sampling, augmentation and general-data replay.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Iterable

from tqdm.auto import tqdm

from ..config import Recipe
from ..errors import InputError, phase
from ..evaluate.choice import apply_choice, recipe_choice, reference_answers, unset_keys
from ..provenance import provenance
from .augment import augment_record
from .domain import adversarial_filter
from .formats import read_samples
from .quality import DropLog, LengthFn, QualityChecks, chunked, record_text
from .report import write_reports
from .sources import build_source, file_samples
from .stratify import stratify_train

SPLITS = ("train", "dev", "test")
# The general data that ships with dstune (scripts/make_general_set.py), in two parts that share nothing. Replay
# here and the KL anchor read the replay part; the tier-1 evaluation (dstune.evaluate.general) reads the held-out one.
GENERAL_DIR = Path(__file__).parent / "general"
GENERAL_SET = GENERAL_DIR / "general.jsonl"  # replay / anchor questions
GENERAL_TEXT = GENERAL_DIR / "general_text.txt"  # anchor prose
GENERAL_TEST = GENERAL_DIR / "general_test.jsonl"  # held-out tier-1 questions
GENERAL_TEST_TEXT = GENERAL_DIR / "general_test_text.txt"  # held-out tier-1 prose, for perplexity


def with_system_prompt(record: dict, system_prompt: str | None) -> dict:
    """Prepend the recipe's system prompt unless the conversation has its own (raw text stays as it is)."""
    messages = record.get("messages")
    if system_prompt and messages and messages[0]["role"] != "system":
        record["messages"] = [{"role": "system", "content": system_prompt}, *messages]
    return record


def token_lengths(recipe: Recipe) -> LengthFn:
    """Tokens of each sample as training sees it: rendered with the chat template, or raw text plus EOS."""
    from ..models.loading import load_tokenizer, resolve_model_path
    from .templates import get_template

    tokenizer = load_tokenizer(resolve_model_path(recipe.model.name_or_path), recipe.model.trust_remote_code)
    template = get_template(recipe.model.template, tokenizer)
    eos = 1 if tokenizer.eos_token_id is not None else 0

    def lengths(records: list[dict]) -> list[int]:
        texts = [r["text"] if "text" in r else template.conversation_text(r["messages"]) for r in records]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(x) + (eos if "text" in r else 0) for x, r in zip(ids, records)]

    lengths.count = lambda texts: [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return lengths


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    """Write records one per line, to a temporary file renamed into place; returns how many."""
    count = 0
    # One temporary name per process: two writers of the same split never rename each other's file away.
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with partial.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    os.replace(partial, path)  # readers never see a half-written split
    return count


def load_split(data_dir: Path, split: str) -> list[dict]:
    """Records of one split of a dataset folder (an empty list if the split is absent)."""
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def check_splits(recipe: Recipe, log: DropLog, out: Path, lengths: LengthFn | None) -> tuple[dict, dict, QualityChecks]:
    """Stream each split of the data source through the quality checks into out/<split>.jsonl; returns counts."""
    data = recipe.data
    sources, stats = build_source(data, log)
    checks = QualityChecks(data.quality, log, lengths, data.max_length)
    counts = {}
    for split in ("dev", "test", "train"):  # eval splits first: training records are checked for leaks
        path = out / f"{split}.jsonl"
        if split not in sources:
            path.unlink(missing_ok=True)
            continue
        prepared = (with_system_prompt(r, data.system_prompt) for r in sources[split])
        passed = tqdm(checks.run(split, prepared), desc=f"checking {split}", unit=" records", disable=None)
        counts[split] = write_jsonl(path, passed)
    return counts, stats, checks


def checked_file(recipe: Recipe, path: str | Path, split: str = "test") -> tuple[list[dict], dict]:
    """The records of one file that pass the data stage's checks (as that split), and the books of what dropped."""
    data = recipe.data
    log = DropLog(strict=data.quality.strict)
    checks = QualityChecks(data.quality, log, token_lengths(recipe), data.max_length)
    prepared = (with_system_prompt(r, data.system_prompt) for r in file_samples(str(path), split, log, data.fields))
    records = list(tqdm(checks.run(split, prepared), desc=f"checking {Path(path).name}", unit=" records",
                        disable=None))
    return records, log.summary({split: len(records)})


@phase("building the dataset")
def build_dataset(recipe: Recipe) -> Path:
    """Run the data source, the checks and the selection; write the dataset folder and its reports."""
    data = recipe.data
    log = DropLog(strict=data.quality.strict)
    out = recipe.run_dir / "data"
    out.mkdir(parents=True, exist_ok=True)
    lengths = token_lengths(recipe)
    counts, stats, checks = check_splits(recipe, log, out, lengths)
    stages = [{"stage": "checked", **counts}]
    if not counts.get("train"):
        raise InputError(f"data.source={data.source!r}: no training samples left "
                         f"(dropped: {dict(log.dropped.get('train', {}))})")
    selection = {}
    if data.adversarial.reference or data.stratify.key or data.stratify.terms or data.augment.rules \
            or data.replay.ratio:
        splits = {split: load_split(out, split) for split in counts}
        if data.adversarial.reference:
            reference = reference_texts(data.adversarial.reference, splits, data.fields)
            splits["train"], selection["adversarial"] = adversarial_filter(
                splits["train"], reference, data.adversarial, log, data.seed)
            stages.append({"stage": "domain filter", "train": len(splits["train"])})
        if data.stratify.key or data.stratify.terms:
            selection["coverage"] = stratify_train(splits, data.stratify, log, data.seed)
            stages.append({"stage": "stratified", "train": len(splits["train"])})
        if data.augment.rules:
            selection["augmentation"] = augment_split(splits, recipe, log, lengths)
            stages.append({"stage": "augmented", "train": len(splits["train"])})
        if data.replay.ratio:
            selection["replay"] = replay_split(splits, recipe, log, checks)
            stages.append({"stage": "replay", "train": len(splits["train"])})
        if not splits["train"]:
            raise InputError("data: the selection left no training samples (see data.adversarial, data.stratify)")
        counts["train"] = write_jsonl(out / "train.jsonl", splits["train"])
    choice = metric_choice(recipe, out, lengths.count)
    # The replay pool's books: what was mixed into train counts as its kept records.
    report = log.summary({**counts, **({"replay": selection["replay"]["added"]} if "replay" in selection else {})})
    manifest = {"stage": "data", "source": data.source, "counts": counts, **stats, **selection, "stages": stages,
                "quality": report, "max_length": data.max_length, "near_threshold": data.quality.near_threshold,
                **({"metric_choice": choice} if choice else {}), "provenance": provenance(recipe)}
    write_reports(out, recipe.name, manifest)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    return out


def metric_choice(recipe: Recipe, out: Path, count_tokens) -> dict | None:
    """Metrics and answer length chosen from the eval splits' answers (train's without them), for what the recipe
    leaves unset (dstune.evaluate.choice); None when it sets them all."""
    if not unset_keys(recipe):
        return None
    answers = reference_answers(load_split(out, "dev") + load_split(out, "test")) or reference_answers(
        load_split(out, "train"))
    return recipe_choice(recipe, answers, count_tokens)


def with_data_defaults(recipe: Recipe, data_dir: Path | None = None) -> Recipe:
    """The recipe with the metric choice of its dataset folder applied where it sets none."""
    manifest = Path(data_dir or recipe.run_dir / "data") / "manifest.json"
    if not manifest.is_file() or not unset_keys(recipe):
        return recipe
    return apply_choice(recipe, json.loads(manifest.read_text()).get("metric_choice"))


def reference_texts(reference: str, splits: dict[str, list[dict]], fields: dict[str, str]) -> list[str]:
    """The target-domain sample for adversarial validation: an eval split, or a file or folder of records."""
    if reference in ("dev", "test"):
        if not splits.get(reference):
            raise InputError(f"data.adversarial.reference: the {reference} split is empty or absent")
        return [record_text(r) for r in splits[reference]]
    return [record_text(r) for r in read_samples(reference, fields)]


def augment_split(splits: dict[str, list[dict]], recipe: Recipe, log: DropLog, lengths: LengthFn | None) -> dict:
    """Append augmented copies of training records; returns how many records each outcome had."""
    options = recipe.data.augment
    rng = random.Random(options.seed)
    outcomes: Counter = Counter()
    new = []
    for record in splits["train"]:
        for copy in range(options.copies):
            augmented, outcome = augment_record(record, options.rules, rng)
            if augmented is not None:
                augmented["id"] = f"{record['id']}#aug{copy + 1}"
                new.append(augmented)
            else:
                outcomes[outcome] += 1
    kept = []
    for chunk in chunked(new):  # a longer synonym can push a sample over max_length
        for record, length in zip(chunk, lengths(chunk) if lengths else [0] * len(chunk)):
            if length > recipe.data.max_length:
                outcomes["over_length"] += 1
            else:
                record["meta"]["tokens"] = length
                kept.append(record)
    outcomes["augmented"] = len(kept)
    splits["train"] += kept
    log.add("train", "augmented", len(kept))
    return {"rules": sorted(options.rules), "copies": options.copies, "outcomes": dict(outcomes)}


def replay_split(splits: dict[str, list[dict]], recipe: Recipe, log: DropLog, checks: QualityChecks) -> dict:
    """Mix general records into training (ratio x the domain records), checked like any other split."""
    options = recipe.data.replay
    path = options.file or str(GENERAL_SET)
    # Counted before augmentation, so that turning augmentation on or off doesn't change the replay.
    domain = sum(1 for r in splits["train"] if "augmented_from" not in r["meta"])
    checked = list(checks.run("replay", file_samples(path, "replay", log, recipe.data.fields)))
    wanted = round(options.ratio * domain)
    random.Random(recipe.data.seed).shuffle(checked)
    for record in checked[wanted:]:
        log.drop("replay", "not_sampled", record["meta"]["source"], f"over data.replay.ratio={options.ratio}",
                 problem=False)
    chosen = checked[:wanted]
    for record in chosen:
        record["meta"]["replay"] = True
    splits["train"] += chosen
    log.add("train", "replay", len(chosen))
    return {"file": path, "ratio": options.ratio, "wanted": wanted, "available": len(checked), "added": len(chosen)}
