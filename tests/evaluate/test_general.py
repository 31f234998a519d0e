"""Tier 1: general capability kept, its retention ratio and the gate; the three tiers in the run report."""

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from dstune.data.build import GENERAL_TEST, GENERAL_TEST_TEXT
from dstune.data.formats import read_samples
from dstune.evaluate.general import general_eval, general_records, perplexity, retention
from dstune.evaluate.stats import perplexity_ci, perplexity_ratio_ci


def test_perplexity_matches_the_model_loss(tiny_model_dirs, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    text = "The patient was given two tablets of paracetamol after lunch and slept well."
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    result = perplexity(model, tokenizer, text, window=256)
    assert result["tokens"] == ids.shape[1] - 1 and result["windows"] == [[pytest.approx(float(loss) * result["tokens"]),
                                                                             result["tokens"]]]
    assert result["perplexity"] == pytest.approx(float(torch.exp(loss)), rel=1e-5)


def test_general_records_spread_over_the_heldout_set():
    records = general_records(None, 40)
    assert len(records) == 40 and all(r["id"].startswith("general-test-") for r in records)
    assert {r["meta"]["lang"] for r in records} == {"en", "zh"} and len({r["meta"]["category"] for r in records}) >= 8


def test_tier1_reads_the_heldout_questions_and_prose_by_default(tiny_recipe, tiny_model_dirs, tokenizer):
    from transformers import AutoModelForCausalLM

    from dstune.config import load_recipe
    from dstune.data.templates import get_template

    recipe = load_recipe(tiny_recipe(eval={"general": {"enabled": True, "max_samples": 4, "max_new_tokens": 2}}))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    out = general_eval(model, tokenizer, get_template("auto", tokenizer), recipe.eval.general, 4,
                      bootstrap_samples=50)
    heldout = {r["id"] for r in read_samples(GENERAL_TEST)}
    assert len(out["predictions"]) == 4 and {p["id"] for p in out["predictions"]} <= heldout
    ppl = perplexity(model, tokenizer, GENERAL_TEST_TEXT.read_text(encoding="utf-8"))
    assert out["perplexity_tokens"] == ppl["tokens"] and out["perplexity_windows"] == ppl["windows"]
    assert out["perplexity_ci"][0] <= out["perplexity"] <= out["perplexity_ci"][1]
    assert out["accuracy_ci"][0] <= out["accuracy"] <= out["accuracy_ci"][1]


def test_perplexity_ci_holds_the_estimate_narrows_with_more_text_and_repeats_with_a_seed(tiny_model_dirs, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    text = GENERAL_TEST_TEXT.read_text(encoding="utf-8")
    short, long = (perplexity(model, tokenizer, t, window=64)["windows"] for t in (text[:2000], text))
    width = {}
    for name, windows in (("short", short), ("long", long)):
        ci = perplexity_ci(windows, 500, seed=3)
        point = perplexity(model, tokenizer, text[:2000] if name == "short" else text, window=64)["perplexity"]
        assert ci["value"] == pytest.approx(point, rel=1e-9) and ci["low"] <= ci["value"] <= ci["high"]
        assert perplexity_ci(windows, 500, seed=3) == ci  # the same seed, the same interval
        width[name] = ci["high"] - ci["low"]
    assert len(long) > 4 * len(short) and width["long"] < width["short"] / 1.5
    # A model against itself keeps everything, on every resample.
    assert perplexity_ratio_ci(long, long, 200) == {"value": 1.0, "low": 1.0, "high": 1.0, "samples": 200}


def test_retention_ratios_and_gate():
    base = {"accuracy": 0.40, "perplexity": 10.0}
    # accuracy 0.36 / 0.40 = 0.9; perplexity 10 / 12.5 = 0.8 (lower is better): the worst is 0.8.
    verdict = retention(base, {"accuracy": 0.36, "perplexity": 12.5}, 0.85)
    assert verdict == {"accuracy": 0.9, "perplexity": 0.8, "worst": 0.8, "min_retention": 0.85, "passed": False}
    assert retention(base, {"accuracy": 0.44, "perplexity": 9.0}, 0.95)["passed"] is True
    assert retention(base, {"accuracy": 0.1, "perplexity": 9.0}, None)["passed"] is None
    # A base that answers nothing right has no accuracy retention; perplexity still counts.
    assert retention({"accuracy": 0.0, "perplexity": 10.0}, {"accuracy": 0.0, "perplexity": 10.0}, 0.95)["accuracy"] is None


def test_retention_cis_are_paired_and_the_gate_reads_the_point_estimate():
    def side(answers, windows):
        predictions = [{"id": str(i), "expected": "yes", "got": got} for i, got in enumerate(answers)]
        accuracy = sum(p["got"] == "yes" for p in predictions) / len(predictions)
        nll, tokens = sum(w[0] for w in windows), sum(w[1] for w in windows)
        return {"accuracy": accuracy, "metric": "exact_match", "predictions": predictions,
                "perplexity": math.exp(nll / tokens), "perplexity_windows": windows}

    windows = [[2.0 + 0.1 * i, 10] for i in range(20)]
    base = side(["yes"] * 30 + ["no"] * 10, windows)
    tuned = side(["yes"] * 27 + ["no"] * 13, [[nll * 1.5, n] for nll, n in windows])
    verdict = retention(base, tuned, 0.9, bootstrap_samples=300)
    assert verdict["accuracy"] == 0.9 and verdict["passed"] is False  # perplexity retention < 0.9: the worst fails
    for name in ("accuracy", "perplexity"):
        low, high = verdict[f"{name}_ci"]
        assert low <= verdict[name] <= high and high - low < 0.5, name
    # Tuned scores at most base on every question: no resample can show a gain.
    assert verdict["accuracy_ci"][1] <= 1.0
    assert "accuracy_ci" not in retention(base, tuned, 0.9)  # no bootstrap, no CIs


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
    for side in ("base", "tuned"):  # tier 1 with 95% CIs; the per-window sums stay in the eval files
        for name in ("accuracy", "perplexity"):
            low, high = general[side][f"{name}_ci"]
            assert low <= general[side][name] <= high
        assert "perplexity_windows" not in general[side] and "predictions" not in general[side]
    low, high = general["retention"]["perplexity_ci"]
    assert low <= general["retention"]["perplexity"] <= high
    assert general["retention"]["perplexity"] == pytest.approx(
        general["base"]["perplexity"] / general["tuned"]["perplexity"], rel=1e-3)
    assert set(report["checks"]["tuned"]["pass_rates"]) == {"one_word"}
    markdown = (tmp_path / "runs" / "tiny" / "report.md").read_text()
    assert "tier 1: general | base [95% CI]" in markdown and "FAILED" in markdown and "completion rate" in markdown
    assert f"{general['tuned']['perplexity']:.4f} [{general['tuned']['perplexity_ci'][0]:.3f}, " in markdown
    html = (tmp_path / "runs" / "tiny" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # loss, metrics with CIs, retention
    assert "Errors of the tuned model" in html or not report["errors"]


def test_contains_answer_for_chatty_answers():
    from dstune.evaluate.metrics import contains_answer

    # Paris is in answer 1 as a word; "Parisian" is not the word Paris; 巴黎 is a substring in Chinese.
    predictions = ["The capital of France is Paris.", "Parisian food", "法国的首都是巴黎。", "8"]
    references = ["Paris", "Paris", "巴黎", "8"]
    assert contains_answer(predictions, references) == 0.75
