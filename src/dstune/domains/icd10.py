"""The demo domain: ICD-10-CM category coding, built from the public CMS data in `simple-icd-10-cm`.

One plugin module: the data source `icd10` (its options are the recipe section `data.icd10`), the metric
`valid_icd10` and the verifier `icd10_in_chapter`. It is one of the registries' builtin modules
(dstune.plugins.DOMAINS); no other dstune code imports it.
"""

from __future__ import annotations

import random
import warnings

from pydantic import field_validator

from ..config import DataConfig, StrictModel
from ..data.quality import DropLog
from ..data.sources import Source
from ..evaluate.metrics import final_answer
from ..plugins import METRICS, SOURCES, VERIFIERS


class ICD10Config(StrictModel):
    """The ICD-10-CM coding task built from the `simple-icd-10-cm` package (the recipe section data.icd10)."""

    # ICD-10-CM chapter numbers: 4 = E00-E89, 9 = I00-I99, 10 = J00-J99.
    chapters: list[str] = ["4", "9", "10"]
    min_billable: int = 4
    dev_fraction: float = 0.1
    test_fraction: float = 0.1
    # Caps the training leaves per category so that large categories don't crowd out small ones.
    max_train_per_category: int | None = None
    question: str = "{description}"

    @field_validator("chapters", mode="before")
    @classmethod
    def _chapters_as_text(cls, value):
        # YAML reads `[4, 9, 10]` as numbers; chapter ids are strings in simple-icd-10-cm.
        return [str(v) for v in value] if isinstance(value, list) else value


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


def build_icd10(options: ICD10Config, seed: int, log: DropLog) -> tuple[dict[str, list[dict]], dict]:
    """Split leaf codes per category into train/dev/test, each description in one split only."""
    cm = _icd()
    rng = random.Random(seed)
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


@SOURCES.register("icd10")
class ICD10Source(Source):
    """Leaf codes of the chosen chapters, split per category; each answer is the code's category."""

    options = ICD10Config

    def build(self, options: ICD10Config, data: DataConfig, log: DropLog) -> tuple[dict[str, list[dict]], dict]:
        return build_icd10(options, data.seed, log)


@METRICS.register("valid_icd10")
def valid_icd10(predictions: list[str], references: list[str]) -> float:
    """Share of answers that are valid ICD-10-CM codes."""
    if not predictions:
        return 0.0
    return sum(is_valid_code(final_answer(p)) for p in predictions) / len(predictions)


@VERIFIERS.register("icd10_in_chapter")
def icd10_in_chapter(answer: str, record: dict) -> bool:
    """A valid ICD-10-CM code, in the chapter of the record (meta.chapter) when it has one."""
    code = final_answer(answer)
    cm = _icd()
    if not cm.is_valid_item(code):
        return False
    chapter = record.get("meta", {}).get("chapter")
    return chapter is None or cm.get_ancestors(code)[-1] == chapter
