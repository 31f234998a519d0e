"""The data stage: build the domain dataset folder (train/dev/test JSONL in messages form, plus a manifest)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from ..config import Recipe
from ..errors import InputError
from .augment import augment_record
from .quality import DropLog, deduplicate, remove_leakage
from .sources import DATA_SOURCES
from .stratify import stratify_train

SPLITS = ("train", "dev", "test")


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Prepend the recipe's system prompt unless the conversation has its own."""
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def build_dataset(recipe: Recipe) -> Path:
    """Run the data source and the quality checks; write the dataset folder and its report; return the folder."""
    quality = recipe.data.quality
    log = DropLog(strict=quality.strict)
    splits, stats = DATA_SOURCES[recipe.data.source](recipe.data, log)
    for split, records in splits.items():
        for record in records:
            record["messages"] = with_system_prompt(record["messages"], recipe.data.system_prompt)
        splits[split] = deduplicate(records, split, log, quality.dedup, quality.near_threshold)
    remove_leakage(splits, log, quality.leakage, quality.near_threshold)
    check_lengths(splits, recipe, log)
    if "train" in splits:
        stats["coverage"] = stratify_train(splits, recipe.data.stratify, log, recipe.data.seed)
    augmentation = augment_split(splits, recipe, log) if recipe.data.augment.rules else None
    if not splits.get("train"):
        raise InputError(f"data.source={recipe.data.source!r}: no training samples left "
                         f"(dropped: {dict(log.dropped.get('train', {}))})")
    out = recipe.run_dir / "data"
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        path = out / f"{split}.jsonl"
        records = splits.get(split)
        if records is None:
            path.unlink(missing_ok=True)
            continue
        with path.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        counts[split] = len(records)
    report = log.summary(counts)
    manifest = {"stage": "data", "source": recipe.data.source, "counts": counts, **stats, "quality": report,
                "augmentation": augmentation}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    (out / "report.md").write_text(data_report_markdown(recipe.name, manifest))
    return out


def augment_split(splits: dict[str, list[dict]], recipe: Recipe, log: DropLog) -> dict:
    """Append augmented copies of training records; returns how many records each outcome had."""
    options = recipe.data.augment
    rng = random.Random(options.seed)
    outcomes: Counter = Counter()
    new = []
    for record in splits["train"]:
        for copy in range(options.copies):
            augmented, outcome = augment_record(record, options.rules, rng)
            outcomes[outcome] += 1
            if augmented is not None:
                augmented["id"] = f"{record['id']}#aug{copy + 1}"
                new.append(augmented)
    splits["train"] += new
    log.add("train", "augmented", len(new))
    return {"rules": sorted(options.rules), "copies": options.copies, "outcomes": dict(outcomes)}


def check_lengths(splits: dict[str, list[dict]], recipe: Recipe, log: DropLog) -> None:
    """Drop, count as truncated, or refuse samples longer than data.max_length tokens with the chat template."""
    from ..models.loading import load_tokenizer, resolve_model_path
    from .templates import get_template

    limit, policy = recipe.data.max_length, recipe.data.quality.overlong
    tokenizer = load_tokenizer(resolve_model_path(recipe.model.name_or_path), recipe.model.trust_remote_code)
    template = get_template(recipe.model.template, tokenizer)
    for split, records in splits.items():
        kept = []
        for record in records:
            text = "".join(piece for piece, _ in template.render(record["messages"], False))
            length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if length <= limit:
                kept.append(record)
                continue
            where = record["meta"].get("source", record["id"])
            if policy == "raise":
                raise InputError(f"{where}: {length} tokens, over data.max_length={limit} "
                                 "(data.quality.overlong=raise)")
            if policy == "truncate":
                log.change(split, "truncated")
                kept.append(record)
            else:
                log.drop(split, "over_length", where, f"{length} tokens > data.max_length={limit}")
        splits[split] = kept


def data_report_markdown(name: str, manifest: dict) -> str:
    """The data report: per split, input = kept + dropped by reason, then example messages per reason."""
    quality = manifest["quality"]
    lines = [f"# Data report: {name}", "", f"Source: `{manifest['source']}`.", "",
             "| split | input | kept | dropped | changed | added |", "|---|---|---|---|---|---|"]

    def listed(counts: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "0"

    for split, row in quality["splits"].items():
        lines.append(f"| {split} | {row['input']} | {row['kept']} | {listed(row['dropped'])} | "
                     f"{listed(row['changed'])} | {listed(row.get('added', {}))} |")
    if manifest.get("coverage"):
        cov = manifest["coverage"]
        train = cov["train"]
        lines += ["", f"Coverage by `{cov['by']}`: {train['covered']}/{train['strata']} strata in train "
                      f"({100 * train['coverage']:.1f}%), at least {train['min_count']} examples each."]
        if train["uncovered"]:
            lines.append(f"Uncovered: {', '.join(train['uncovered'][:50])}.")
        for split in ("dev", "test"):
            if f"{split}_strata_in_train" in cov:
                part = cov[f"{split}_strata_in_train"]
                lines.append(f"{split.capitalize()} strata seen in train: {part['covered']}/{part['strata']} "
                             f"({100 * part['coverage']:.1f}%).")
    if manifest.get("augmentation"):
        augmentation = manifest["augmentation"]
        lines += ["", f"Augmentation rules {', '.join(augmentation['rules'])}, {augmentation['copies']} "
                      f"cop{'y' if augmentation['copies'] == 1 else 'ies'} per record: {listed(augmentation['outcomes'])}."]
    for reason, examples in sorted(quality["examples"].items()):
        lines += ["", f"## {reason}", ""] + [f"- `{e}`" for e in examples]
    return "\n".join(lines) + "\n"


def load_split(data_dir: Path, split: str) -> list[dict]:
    """Records of one split of a dataset folder (an empty list if the split is absent)."""
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
