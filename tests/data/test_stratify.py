"""Stratified sampling: a small budget still covers every stratum / term that the data has, k times if it can."""

import json
import random
from collections import Counter

from dstune import api
from dstune.config import load_recipe
from dstune.data.stratify import coverage, field_key, stratified_sample, term_key


def rec(i, text, category):
    return {"id": str(i), "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": category}],
            "meta": {"category": category, "source": f"f:{i}"}}


def skewed():
    """90 records of category A, 8 of B, 2 of C."""
    counts = {"A": 90, "B": 8, "C": 2}
    return [rec(i, f"case {i}", c) for i, c in enumerate(c for c, n in counts.items() for _ in range(n))]


def test_small_budget_covers_every_stratum_k_times_where_possible():
    records = skewed()
    key = field_key("meta.category")
    random_pick = random.Random(0).sample(records, 10)
    assert coverage(random_pick, key)["covered"] < 3 or Counter(r["meta"]["category"] for r in random_pick)["C"] < 2
    sample = stratified_sample(records, key, target=10, min_per_stratum=3, rng=random.Random(0))
    counts = Counter(r["meta"]["category"] for r in sample)
    assert len(sample) == 10
    assert counts["C"] == 2 and counts["B"] >= 3 and counts["A"] >= 3  # C has only 2 in the data
    assert stratified_sample(records, key, 10, 3, random.Random(0)) == sample  # seeded


def test_budget_below_the_number_of_strata_still_spreads_one_each():
    records = [rec(i, f"t{i}", f"S{i % 7}") for i in range(70)]
    sample = stratified_sample(records, field_key("meta.category"), target=5, min_per_stratum=2, rng=random.Random(1))
    assert len({r["meta"]["category"] for r in sample}) == 5


def test_terms_are_found_in_text_and_uncovered_terms_are_listed():
    records = [rec(0, "Type 2 diabetes with hypertension", "x"), rec(1, "asthma attack", "y"),
               rec(2, "高血压病史十年", "z")] + [rec(i, f"routine visit {i}", "w") for i in range(3, 40)]
    key = term_key(["diabetes", "Hypertension", "asthma", "高血压", "sepsis"])
    sample = stratified_sample(records, key, target=4, min_per_stratum=1, rng=random.Random(0))
    report = coverage(sample, key, ["diabetes", "Hypertension", "asthma", "高血压", "sepsis"])
    assert report["covered"] == 4 and report["uncovered"] == ["sepsis"] and report["coverage"] == 0.8
    assert key(rec(9, "diabetesmellitus", "x")) == []  # whole words for English terms


def test_recipe_sampling_counts_not_sampled_records_and_reports_coverage(tiny_recipe, tmp_path):
    train = tmp_path / "t.jsonl"
    rows = [{"instruction": f"case {i}", "output": c, "meta": {"category": c}}
            for i, c in enumerate(["A"] * 30 + ["B"] * 3 + ["C"])]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(tiny_recipe(data={"train_file": str(train), "dev_file": None, "test_file": None,
                                           "stratify": {"key": "meta.category", "target": 8, "min_per_stratum": 2}}))
    out = api.data(recipe)
    manifest = json.loads((out / "manifest.json").read_text())
    books = manifest["quality"]["splits"]["train"]
    assert books == {"input": 34, "kept": 8, "dropped": {"not_sampled": 26}, "changed": {}}
    cov = manifest["coverage"]["train"]
    assert cov["covered"] == cov["strata"] == 3 and cov["coverage"] == 1.0
    kept = Counter(json.loads(x)["meta"]["category"] for x in (out / "train.jsonl").read_text().splitlines())
    assert kept["C"] == 1 and kept["B"] >= 2 and kept["A"] >= 2
    assert "Coverage by `meta.category`: 3/3 strata in train (100.0%)" in (out / "report.md").read_text()
