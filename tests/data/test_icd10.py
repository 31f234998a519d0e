from collections import Counter

from dstune.config import DataConfig, ICD10Config
from dstune.data.icd10 import build_icd10, category_leaves, is_valid_code
from dstune.data.quality import DropLog


def test_default_chapters_give_about_145_categories():
    categories = category_leaves(ICD10Config())
    assert 130 <= len(categories) <= 160
    assert all(len(leaves) >= 4 for leaves in categories.values())
    assert {code[0] for code in categories} == {"E", "I", "J"}


def test_splits_share_no_leaf_or_description_and_cover_categories():
    log = DropLog()
    splits, _ = build_icd10(DataConfig(source="icd10", icd10=ICD10Config(max_train_per_category=5)), log)
    ids = {name: {r["id"] for r in records} for name, records in splits.items()}
    assert not ids["train"] & ids["dev"] and not ids["train"] & ids["test"] and not ids["dev"] & ids["test"]
    described = {name: {r["messages"][0]["content"].lower() for r in records} for name, records in splits.items()}
    assert not described["train"] & described["test"] and not described["dev"] & described["test"]
    train_categories = {r["meta"]["category"] for r in splits["train"]}
    assert {r["meta"]["category"] for r in splits["test"]} <= train_categories
    assert max(Counter(r["meta"]["category"] for r in splits["train"]).values()) <= 5
    # Every leaf of every category is either in a split or counted as dropped, and the books balance.
    total = sum(len(v) for v in category_leaves(ICD10Config()).values())
    books = log.summary({**{name: len(records) for name, records in splits.items()}, "unsplit": 0})["splits"]
    assert sum(row["input"] for row in books.values()) == total
    assert books["train"]["dropped"]["over_max_train_per_category"] > 0
    for record in splits["test"]:
        assert record["id"].startswith(record["messages"][1]["content"])


def test_split_is_reproducible():
    a, _ = build_icd10(DataConfig(source="icd10", seed=3), DropLog())
    b, _ = build_icd10(DataConfig(source="icd10", seed=3), DropLog())
    assert [r["id"] for r in a["test"]] == [r["id"] for r in b["test"]]


def test_valid_code_check():
    assert is_valid_code("E11") and is_valid_code(" J45.909 ")
    assert not is_valid_code("E99.99X") and not is_valid_code("diabetes")
