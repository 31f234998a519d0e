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
