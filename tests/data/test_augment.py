"""Rule-based augmentation in Chinese and English: values change consistently in prompt and answer, or not at all."""

import json
import random

from dstune import api
from dstune.config import load_recipe
from dstune.data.augment import augment_record


def record(prompt, answer, rid="r1"):
    return {"id": rid, "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "meta": {}}


def texts(rec):
    return rec["messages"][0]["content"], rec["messages"][1]["content"]


def test_english_dose_changes_prompt_and_answer_together():
    new, outcome = augment_record(record("Start metoprolol 25mg twice daily.", "Give 25mg at 8am and 8pm."),
                                  {"dose": {"factors": [2]}}, random.Random(0))
    assert outcome == "augmented"
    assert texts(new) == ("Start metoprolol 50mg twice daily.", "Give 50mg at 8am and 8pm.")
    assert new["meta"]["augmented_from"] == "r1"


def test_chinese_dose_with_unit_and_range():
    rules = {"dose": {"factors": [0.5, 2], "ranges": {"毫克": [10, 40]}}}
    new, outcome = augment_record(record("阿司匹林每日20毫克口服", "剂量为20毫克"), rules, random.Random(1))
    assert outcome == "augmented"
    value = "10" if "10毫克" in texts(new)[0] else "40"
    assert texts(new) == (f"阿司匹林每日{value}毫克口服", f"剂量为{value}毫克")


def test_dose_outside_every_allowed_range_is_not_a_match():
    rules = {"dose": {"factors": [2], "ranges": {"mg": [0, 30]}}}
    assert augment_record(record("take 25 mg", "ok"), rules, random.Random(0)) == (None, "no_match")


def test_bare_number_in_the_answer_makes_a_dose_change_inconsistent():
    new, outcome = augment_record(record("Insulin 10 units before meals", "Inject 10 before each meal"),
                                  {"dose": {"factors": [2]}}, random.Random(0))
    assert (new, outcome) == (None, "inconsistent")


def test_dates_generalise_in_both_languages():
    new, _ = augment_record(record("2023年确诊高血压，目前用药？", "氨氯地平"),
                            {"date": {"periods_zh": ["最近三年"]}}, random.Random(0))
    assert texts(new)[0] == "最近三年确诊高血压，目前用药？"
    new, _ = augment_record(record("Diagnosed with asthma in 2023; which inhaler?", "Budesonide"),
                            {"date": {"periods_en": ["in the past three years"]}}, random.Random(0))
    assert texts(new)[0] == "Diagnosed with asthma in the past three years; which inhaler?"
    assert augment_record(record("Diagnosed in 2023.", "Since 2023, asthma."), {"date": {}},
                          random.Random(0)) == (None, "inconsistent")


def test_synonyms_whole_words_in_english_and_substrings_in_chinese():
    rules = {"synonym": {"terms": {"fever": ["pyrexia"], "发热": ["发烧"]}}}
    new, _ = augment_record(record("High fever and feverish chills; 发热三天", "fever of unknown origin"),
                            rules, random.Random(0))
    assert texts(new) == ("High pyrexia and feverish chills; 发烧三天", "pyrexia of unknown origin")


def test_augmentation_is_seeded_and_counted_in_the_data_report(tiny_recipe, tmp_path):
    train = tmp_path / "doses.jsonl"
    rows = [("take 25mg daily", "25mg"), ("take 5 mg", "dose 5"), ("rest", "ok"), ("take 100mg", "100mg daily")]
    train.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in rows))
    data = {"train_file": str(train), "dev_file": None, "test_file": None,
            "augment": {"rules": {"dose": {"factors": [0.5, 2, 3]}}, "copies": 2, "seed": 7}}
    outs = []
    for name in ("a", "b"):
        out = api.data(load_recipe(tiny_recipe(name=name, data=data)))
        outs.append((out / "train.jsonl").read_text())
        manifest = json.loads((out / "manifest.json").read_text())
    assert outs[0] == outs[1]  # same seed, same copies
    assert manifest["augmentation"]["outcomes"] == {"augmented": 4, "inconsistent": 2, "no_match": 2}
    books = manifest["quality"]["splits"]["train"]
    assert books["input"] == 4 and books["kept"] == 4 and books["added"] == {"augmented": 4}
    assert manifest["counts"]["train"] == 8


def test_raw_text_records_are_augmented_in_place():
    import random

    from dstune.data.augment import augment_record

    record = {"id": "t1", "text": "Give 25mg twice daily in 2023.", "meta": {}}
    out, outcome = augment_record(record, {"dose": {"factors": [2]}, "date": {"periods_en": ["in recent years"]}},
                                  random.Random(0))
    assert outcome == "augmented" and "messages" not in out
    assert out["text"] == "Give 50mg twice daily in recent years."


DOSE_CASES = [  # prompt, answer, the same after doubling; None: the record is left alone
    ("阿司匹林100mg每日一次，饭后服用", "阿司匹林100mg", ("阿司匹林200mg每日一次，饭后服用", "阿司匹林200mg")),
    ("氢氯噻嗪25mg qd", "维持25mg", ("氢氯噻嗪50mg qd", "维持50mg")),  # the seed's example: 25mg -> 50mg
    ("布洛芬200-400mg，每6小时一次", "200-400mg", ("布洛芬400-800mg，每6小时一次", "400-800mg")),  # a range
    ("布洛芬200～400毫克", "无", ("布洛芬400～800毫克", "无")),  # a full-width tilde
    ("布洛芬２５ｍｇ口服", "剂量２５ｍｇ", ("布洛芬５０ｍｇ口服", "剂量５０ｍｇ")),  # full-width digits and unit
    ("氨氯地平5 毫克 每日", "5毫克", ("氨氯地平10 毫克 每日", "10毫克")),  # spaced, and restated without the space
    ("metformin 500 mg bid", "500mg twice daily", ("metformin 1000 mg bid", "1000mg twice daily")),
    ("take 5 to 10 mg", "5 to 10 mg", ("take 10 to 20 mg", "10 to 20 mg")),
    ("阿司匹林100mg每日两次", "每日总量200mg", None),  # the answer scales the dose
    ("二甲双胍500毫克每日两次", "一日1000毫克", None),
    ("Insulin 10 units before meals", "Inject 10 before each meal", None),  # the bare number
]


def test_doses_are_rewritten_where_clinicians_write_them_in_chinese_and_english():
    for prompt, answer, expected in DOSE_CASES:
        new, outcome = augment_record(record(prompt, answer), {"dose": {"factors": [2]}}, random.Random(0))
        if expected is None:
            assert (new, outcome) == (None, "inconsistent"), prompt
        else:
            assert outcome == "augmented" and texts(new) == expected, prompt


def test_a_copy_equal_to_its_source_is_no_change_not_augmented(tiny_recipe, tmp_path):
    assert augment_record(record("take 25mg", "25mg"), {"dose": {"factors": [1]}}, random.Random(0)) == (
        None, "no_change")
    assert augment_record(record("high fever", "ok"), {"synonym": {"terms": {"fever": ["fever"]}}},
                          random.Random(0)) == (None, "no_change")
    train = tmp_path / "same.jsonl"
    train.write_text(json.dumps({"instruction": "阿司匹林100mg每日一次", "output": "阿司匹林"}) + "\n")
    data = {"train_file": str(train), "dev_file": None, "test_file": None,
            "augment": {"rules": {"synonym": {"terms": {"阿司匹林": ["阿司匹林"]}}}}}
    out = api.data(load_recipe(tiny_recipe(name="same", data=data)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["augmentation"]["outcomes"] == {"no_change": 1, "augmented": 0}
    assert manifest["counts"]["train"] == 1
