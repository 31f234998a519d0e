"""Tier 1: general capability kept, its retention ratio and the gate; the three tiers in the run report."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from dstune.evaluate.general import general_records, perplexity, retention


def test_perplexity_matches_the_model_loss(tiny_model_dirs, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    text = "The patient was given two tablets of paracetamol after lunch and slept well."
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    result = perplexity(model, tokenizer, text, window=256)
    assert result["tokens"] == ids.shape[1] - 1
    assert result["perplexity"] == pytest.approx(float(torch.exp(loss)), rel=1e-5)


def test_general_records_spread_over_the_shipped_set():
    records = general_records(None, 40)
    assert len(records) == 40
    assert {r["meta"]["lang"] for r in records} == {"en", "zh"} and len({r["meta"]["category"] for r in records}) >= 8


def test_retention_ratios_and_gate():
    base = {"accuracy": 0.40, "perplexity": 10.0}
    # accuracy 0.36 / 0.40 = 0.9; perplexity 10 / 12.5 = 0.8 (lower is better): the worst is 0.8.
    verdict = retention(base, {"accuracy": 0.36, "perplexity": 12.5}, 0.85)
    assert verdict == {"accuracy": 0.9, "perplexity": 0.8, "worst": 0.8, "min_retention": 0.85, "passed": False}
    assert retention(base, {"accuracy": 0.44, "perplexity": 9.0}, 0.95)["passed"] is True
    assert retention(base, {"accuracy": 0.1, "perplexity": 9.0}, None)["passed"] is None
    # A base that answers nothing right has no accuracy retention; perplexity still counts.
    assert retention({"accuracy": 0.0, "perplexity": 10.0}, {"accuracy": 0.0, "perplexity": 10.0}, 0.95)["accuracy"] is None


def test_run_reports_three_tiers_and_fails_the_gate_with_exit_3(tiny_recipe, tmp_path):
    recipe = tiny_recipe(train={"max_steps": 2}, eval={
        "metrics": ["exact_match"], "bootstrap_samples": 200,
        "general": {"enabled": True, "max_samples": 8, "max_new_tokens": 4, "min_retention": 5.0,
                    "metric": "exact_match"},
        "checks": [{"kind": "regex", "name": "one_word", "pattern": r"\w+"}]})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "dstune", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dstune: error: general ability retention ") and "min_retention=5.0" in last
    report = json.loads((tmp_path / "runs" / "tiny" / "report.json").read_text())
    assert report["schema"] == "dstune.report/3"
    row = report["metrics"]["exact_match"]
    assert row["base_ci"][0] <= row["base"] <= row["base_ci"][1] and row["paired"]["diff"] == pytest.approx(row["delta"])
    general = report["general"]
    assert general["base"]["samples"] == 8 and general["retention"]["passed"] is False
    assert general["retention"]["perplexity"] == pytest.approx(
        general["base"]["perplexity"] / general["tuned"]["perplexity"], rel=1e-3)
    assert set(report["checks"]["tuned"]["pass_rates"]) == {"one_word"}
    markdown = (tmp_path / "runs" / "tiny" / "report.md").read_text()
    assert "tier 1: general" in markdown and "FAILED" in markdown and "completion rate" in markdown
    html = (tmp_path / "runs" / "tiny" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # loss, metrics with CIs, retention
    assert "Errors of the tuned model" in html or not report["errors"]


def test_contains_answer_for_chatty_answers():
    from dstune.evaluate.metrics import contains_answer

    # Paris is in answer 1 as a word; "Parisian" is not the word Paris; 巴黎 is a substring in Chinese.
    predictions = ["The capital of France is Paris.", "Parisian food", "法国的首都是巴黎。", "8"]
    references = ["Paris", "Paris", "巴黎", "8"]
    assert contains_answer(predictions, references) == 0.75
