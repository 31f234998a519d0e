"""The demo domain: ICD-10-CM category coding, built from the public CMS data in `simple-icd-10-cm`."""

from __future__ import annotations

import random
import warnings

from ..config import DataConfig, ICD10Config
from .quality import DropLog


def _icd():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package imports the deprecated pkg_resources
        import simple_icd_10_cm

    return simple_icd_10_cm


def category_leaves(options: ICD10Config) -> dict[str, list[str]]:
    """Categories of the chosen chapters that have at least `min_billable` billable (leaf) codes."""
    cm = _icd()
    out = {}
    for chapter in options.chapters:
        for code in cm.get_descendants(chapter):
            if cm.is_category(code):
                leaves = [d for d in cm.get_descendants(code) if cm.is_leaf(d)]
                if len(leaves) >= options.min_billable:
                    out[code] = leaves
    return out


def is_valid_code(text: str) -> bool:
    """Whether the text is a valid ICD-10-CM code (category or any other level)."""
    return _icd().is_valid_item(text.strip())


def build_icd10(config: DataConfig, log: DropLog) -> tuple[dict[str, list[dict]], dict]:
    """Split leaf codes per category into train/dev/test, each description in one split only."""
    options = config.icd10
    cm = _icd()
    rng = random.Random(config.seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    categories = category_leaves(options)
    for category, leaves in sorted(categories.items()):
        unique = []
        for leaf in leaves:
            description = cm.get_description(leaf).strip()
            if description.lower() in seen:
                # Not yet in a split: these books are kept under "unsplit".
                log.seen("unsplit")
                log.drop("unsplit", "duplicate_description", leaf, f"description {description!r} seen before",
                         problem=False)
                continue
            seen.add(description.lower())
            unique.append((leaf, description))
        rng.shuffle(unique)
        n_test = max(1, round(options.test_fraction * len(unique)))
        n_dev = max(1, round(options.dev_fraction * len(unique)))
        parts = {"test": unique[:n_test], "dev": unique[n_test:n_test + n_dev], "train": unique[n_test + n_dev:]}
        for split, items in parts.items():
            log.seen(split, len(items))
        cap = options.max_train_per_category
        if cap is not None and len(parts["train"]) > cap:
            for leaf, _ in parts["train"][cap:]:
                log.drop("train", "over_max_train_per_category", leaf, f"category {category} has {cap} already",
                         problem=False)
            parts["train"] = parts["train"][:cap]
        for split, items in parts.items():
            for leaf, description in items:
                question = options.question.format(description=description)
                splits[split].append({
                    "id": leaf,
                    "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": category}],
                    "meta": {"category": category, "chapter": cm.get_ancestors(category)[-1], "source": leaf},
                })
    for items in splits.values():
        rng.shuffle(items)
    stats = {"categories": len(categories), "chapters": options.chapters}
    return splits, stats
