"""Tier 3: business end-to-end checks declared in the recipe."""

import pytest

from dstune.errors import InputError
from dstune.evaluate.checks import build_checks, run_checks

SCHEMA = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z][0-9]{2}$"},
                                           "confidence": {"type": "number"}}, "required": ["code"]}


def test_each_check_kind_and_the_completion_rate():
    checks = build_checks([
        {"kind": "json_schema", "name": "schema", "schema": SCHEMA},
        {"kind": "required_fields", "name": "fields", "fields": ["code", "confidence"]},
        {"kind": "regex", "name": "mentions_code", "pattern": r"[A-Z]\d{2}", "search": True},
    ])
    answers = ['{"code": "J20", "confidence": 0.9}',            # passes all three
               '```json\n{"code": "J20"}\n```',                   # fenced JSON; confidence missing
               '{"code": "j20", "confidence": 1}',                # schema pattern fails, no upper-case code
               "J20 is my answer"]                                # not JSON
    records = [{"id": str(i), "meta": {}} for i in range(4)]
    result = run_checks(checks, answers, records)
    assert result["pass_rates"] == {"schema": 0.5, "fields": 0.5, "mentions_code": 0.75}
    assert result["completion_rate"] == 0.25 and result["completed"] == [True, False, False, False]
    problems = {f["id"]: f["problems"] for f in result["failures"]}
    assert problems["1"] == {"fields": "missing confidence"}
    assert set(problems["2"]) == {"schema", "mentions_code"} and "does not match" in problems["2"]["schema"]
    assert problems["3"]["schema"].startswith("not valid JSON")


def test_icd10_verifier_checks_validity_and_chapter():
    checks = build_checks([{"kind": "verifier", "verifier": "icd10_in_chapter"}])
    records = [{"id": "a", "meta": {"chapter": "10"}}, {"id": "b", "meta": {"chapter": "10"}},
               {"id": "c", "meta": {"chapter": "9"}}]
    # J20 is in chapter 10 (J00-J99); I10 is in chapter 9, not 10; Z99X is no code at all.
    result = run_checks(checks, ["J20", "I10", "Z99X"], records)
    assert result["completed"] == [True, False, False]


@pytest.mark.parametrize("declared, message", [
    ([{"kind": "spellcheck"}], r"eval.checks\[0\].kind: 'spellcheck' is not a check"),
    ([{"kind": "regex", "pattern": "("}], "bad regex"),
    ([{"kind": "verifier", "verifier": "nope"}], "unknown verifier 'nope'"),
    ([{"kind": "json_schema", "schema": {"type": 12}}], "invalid JSON Schema"),
])
def test_bad_check_options_name_the_key(declared, message):
    with pytest.raises(InputError, match=message):
        build_checks(declared)
