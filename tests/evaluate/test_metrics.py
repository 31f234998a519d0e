import pytest

from dstune.evaluate.metrics import (
    METRICS,
    accuracy,
    auc,
    entity_f1,
    exact_match,
    final_answer,
    macro_f1,
    rouge_metric,
)
from dstune.evaluate.stats import bootstrap_ci, paired_bootstrap


def test_exact_match_normalises_case_space_period_and_think():
    predictions = ["E11", " e11. ", "<think>diabetes…</think>\nE11", "E10", ""]
    assert exact_match(predictions, ["E11"] * 5) == 3 / 5


def test_final_answer_with_open_think_in_prompt():
    assert final_answer("reasoning here</think>\n\nJ45") == "J45"


def test_empty_inputs_score_zero():
    assert exact_match([], []) == 0.0
    assert all(METRICS[name]([], []) == 0.0 for name in ("accuracy", "macro_f1", "entity_f1", "auc", "rouge1"))


def test_accuracy_compares_answer_letters():
    predictions = ["The answer is B.", "(C) because the pressure is high", "<think>A or B?</think>B", "答案是D",
                   "Hypertension.", "b"]
    references = ["B", "C", "A", "D", "hypertension", "B"]
    # Right: B, C, D (the Han character before it does not hide it), hypertension, "b" (no capital: casefold) = 5 of 6.
    assert accuracy(predictions, references) == pytest.approx(5 / 6)


def test_macro_f1_three_classes():
    references = ["a", "a", "b", "b", "c", "c"]
    predictions = ["A", "b", "b", "b", "c", "x"]
    # a: tp 1, fp 0, fn 1 -> F 2/3;  b: tp 2, fp 1, fn 0 -> P 2/3, R 1, F 4/5;  c: tp 1, fn 1 (x) -> F 2/3.
    # macro = (2/3 + 4/5 + 2/3) / 3 = (10 + 12 + 10) / 45 = 32/45
    assert macro_f1(predictions, references) == pytest.approx(32 / 45)


def test_rouge_english():
    reference, prediction = "The cat sat on the mat.", "the cat on the mat"
    # Unigrams: ref 6, pred 5, overlap 5 -> P 1, R 5/6, F = 2 * 5/6 / (11/6) = 10/11.
    # Bigrams: ref the-cat cat-sat sat-on on-the the-mat (5); pred the-cat cat-on on-the the-mat (4);
    #   overlap 3 -> P 3/4, R 3/5, F = 2 * 9/20 / (27/20) = 2/3.
    # LCS "the cat on the mat" = 5 -> same as ROUGE-1: 10/11.
    assert METRICS["rouge1"]([prediction], [reference]) == pytest.approx(10 / 11)
    assert METRICS["rouge2"]([prediction], [reference]) == pytest.approx(2 / 3)
    assert METRICS["rougeL"]([prediction], [reference]) == pytest.approx(10 / 11)
    # Averaged over samples: an identical pair scores 1.
    assert METRICS["rouge2"]([prediction, "no change"], [reference, "no change"]) == pytest.approx((2 / 3 + 1) / 2)


def test_rouge_chinese_by_character():
    reference, prediction = "患者有高血压", "患者高血压"
    # Characters: ref 患 者 有 高 血 压 (6), pred 患 者 高 血 压 (5): overlap 5 -> P 1, R 5/6, F 10/11.
    # Bigrams: ref 患者 者有 有高 高血 血压 (5), pred 患者 者高 高血 血压 (4):
    #   overlap 3 -> P 3/4, R 3/5, F 2/3.
    # LCS 患者高血压 = 5 -> F 10/11.  (rouge-score's own tokenizer drops these characters and would give 0.)
    assert METRICS["rouge1"]([prediction], [reference]) == pytest.approx(10 / 11)
    assert METRICS["rouge2"]([prediction], [reference]) == pytest.approx(2 / 3)
    assert METRICS["rougeL"]([prediction], [reference]) == pytest.approx(10 / 11)


def test_rouge_chinese_with_jieba():
    reference, prediction = "患者有高血压", "患者高血压"
    # jieba 0.42.1: ref 患者 / 有 / 高血压 (3), pred 患者 / 高血压 (2).
    # Unigrams: overlap 2 -> P 1, R 2/3, F 0.8.
    # Bigrams: ref 患者-有 有-高血压, pred 患者-高血压: overlap 0 -> 0.
    # LCS 患者 高血压 = 2 -> F 0.8.
    assert METRICS["rouge1_jieba"]([prediction], [reference]) == pytest.approx(0.8)
    assert METRICS["rouge2_jieba"]([prediction], [reference]) == pytest.approx(0.0)
    assert rouge_metric("rougeL", chinese="jieba")([prediction], [reference]) == pytest.approx(0.8)


def test_rouge_metric_rejects_unknown_names():
    with pytest.raises(ValueError, match="jieba"):
        rouge_metric("rouge1", chinese="pkuseg")


def test_entity_f1_two_samples():
    references = ["Patient has [disease: type 2 diabetes] treated with [drug: metformin]",
                  "[symptom: cough] and [symptom: fever]",
                  "no entities here"]
    predictions = ["Patient has [Disease: Type 2   diabetes] treated with [drug: insulin]",
                   "[symptom: cough], [symptom: cough] and [drug: fever]",
                   "none here either"]
    # Sample 1: pred 2, ref 2, match 1 (the diabetes span after casefold and whitespace).
    # Sample 2: pred 3, ref 2, match 1 (cough counts once: multiset; fever has the wrong type). Sample 3: nothing.
    # tp 2, predicted 5, reference 4 -> P 2/5, R 1/2, F = 2 * 2 / (5 + 4) = 4/9.
    assert entity_f1(predictions, references) == pytest.approx(4 / 9)
    assert entity_f1(["plain text"], ["also plain"]) == 1.0


def test_auc_on_six_scores():
    references = ["1", "0", "yes", "no", "true", "false"]
    predictions = ["0.9", "0.4", "score: 0.35", "0.2", "n/a", "<think>low</think>0.1"]
    # Positives 0.9, 0.35, 0.0 (unparseable); negatives 0.4, 0.2, 0.1.
    # Pairs ranked right: 0.9 beats 3, 0.35 beats 2 (0.2, 0.1), 0.0 beats 0 -> AUC 5/9.
    assert auc(predictions, references) == pytest.approx(5 / 9)
    assert auc(["0.3", "0.8"], ["1", "1"]) == 0.5


def test_bootstrap_ci_contains_value_and_is_reproducible():
    predictions, references = ["A", "B", "C", "D", "A", "B", "C", "D"], ["A", "B", "C", "A", "A", "C", "C", "D"]
    ci = bootstrap_ci(accuracy, predictions, references, samples=200, seed=3)
    assert ci["value"] == 6 / 8 and ci["low"] <= ci["value"] <= ci["high"] and ci["samples"] == 200
    assert ci["low"] < ci["high"]
    assert bootstrap_ci(accuracy, predictions, references, samples=200, seed=3) == ci


def test_bootstrap_ci_of_constant_metric_is_a_point():
    ci = bootstrap_ci(lambda p, r: 0.5, ["x"] * 5, ["y"] * 5, samples=50)
    assert ci["low"] == ci["high"] == ci["value"] == 0.5


def test_paired_bootstrap_identical_systems():
    predictions, references = ["A", "B", "C", "D"] * 3, ["A", "B", "D", "D"] * 3
    result = paired_bootstrap(accuracy, predictions, predictions, references, samples=200)
    assert result["diff"] == 0 and result["low"] == result["high"] == 0
    assert result["p_value"] == 1.0 and not result["significant"]


def test_paired_bootstrap_detects_a_large_gap():
    references = ["A"] * 50
    weak, strong = ["A"] * 10 + ["B"] * 40, ["A"] * 50
    result = paired_bootstrap(accuracy, weak, strong, references, samples=500, seed=1)
    assert result["a"] == 0.2 and result["b"] == 1.0 and result["diff"] == pytest.approx(0.8)
    assert result["significant"] and result["p_value"] < 0.05 and result["low"] > 0
