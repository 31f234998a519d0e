from dstune.evaluate.metrics import exact_match, final_answer, valid_icd10


def test_exact_match_normalises_case_space_period_and_think():
    predictions = ["E11", " e11. ", "<think>diabetes…</think>\nE11", "E10", ""]
    assert exact_match(predictions, ["E11"] * 5) == 3 / 5


def test_final_answer_with_open_think_in_prompt():
    assert final_answer("reasoning here</think>\n\nJ45") == "J45"


def test_valid_icd10_rate():
    assert valid_icd10(["E11", "J45.909", "X99.999", "asthma"], ["E11"] * 4) == 0.5


def test_empty_inputs_score_zero():
    assert exact_match([], []) == 0.0 and valid_icd10([], []) == 0.0
