"""The ICD-10-CM demo domain: its source, metric and verifier, found through the registries."""

from collections import Counter

from dstune.config import DataConfig, load_recipe
from dstune.data.quality import DropLog
from dstune.data.sources import build_source
from dstune.domains.icd10 import ICD10Config, build_icd10, category_leaves, is_valid_code, valid_icd10
from dstune.plugins import METRICS, SOURCES, VERIFIERS


def test_default_chapters_give_about_145_categories():
    categories = category_leaves(ICD10Config())
    assert 130 <= len(categories) <= 160
    assert all(len(leaves) >= 4 for leaves in categories.values())
    assert {code[0] for code in categories} == {"E", "I", "J"}


def test_splits_share_no_leaf_or_description_and_cover_categories():
    log = DropLog()
    splits, _ = build_icd10(ICD10Config(max_train_per_category=5), 0, log)
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
    a, _ = build_icd10(ICD10Config(), 3, DropLog())
    b, _ = build_source(DataConfig(source="icd10", seed=3), DropLog())  # a DataConfig without plugin sections
    assert [r["id"] for r in a["test"]] == [r["id"] for r in b["test"]]


def test_valid_code_check():
    assert is_valid_code("E11") and is_valid_code(" J45.909 ")
    assert not is_valid_code("E99.99X") and not is_valid_code("diabetes")


def test_valid_icd10_rate():
    assert valid_icd10(["E11", "J45.909", "X99.999", "asthma"], ["E11"] * 4) == 0.5
    assert valid_icd10([], []) == 0.0


def test_the_domain_registers_its_source_metric_and_verifier():
    assert type(SOURCES["icd10"]).options is ICD10Config
    assert METRICS["valid_icd10"] is valid_icd10 and VERIFIERS["icd10_in_chapter"].__module__ == "dstune.domains.icd10"
    recipe = load_recipe("recipes/icd10_lora.yaml")
    assert recipe.data.options("icd10") == ICD10Config(chapters=["4", "9", "10"], max_train_per_category=12)
    assert load_recipe("recipes/icd10_lora.yaml", ["data.icd10.chapters=[10]"]).data.icd10.chapters == ["10"]
