"""The data stage's quality checks: a file with one planted defect of each kind gives exactly the expected books."""

import csv
import json

import pytest

from dstune import api
from dstune.config import load_recipe
from dstune.errors import InputError

WORDS = ("the patient reports chest pain radiating to the left arm with shortness of breath and sweating "
         "since this morning after climbing two flights of stairs while carrying heavy shopping bags home "
         "from the market near the old railway station in the town centre before lunch today").split()


def line(instruction, output="ok"):
    return json.dumps({"instruction": instruction, "output": output}, ensure_ascii=False).encode() + b"\n"


def planted(tmp_path):
    """train.jsonl with one defect of each kind; dev/test hold the originals of the leaked records."""
    long_text = " ".join(WORDS)
    near_copy = " ".join(WORDS[:-1] + ["tomorrow"])
    dev_text = "what is the ICD-10 category of " + " ".join(WORDS[5:40])
    rows = [
        line("Acute bronchitis due to RSV", "J20"),                           # 1 kept
        b'{"instruction": "broken", "output": \n',                            # 2 malformed JSON
        b'{"instruction": "\xff\xfe", "output": "x"}\n',                      # 3 invalid UTF-8
        json.dumps({"instruction": "no answer"}).encode() + b"\n",            # 4 missing field
        line("empty answer", "   "),                                          # 5 empty field
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                 {"role": "assistant", "content": "c"}]}).encode() + b"\n",  # 6 role order
        line("word " * 300),                                                  # 7 over length
        line("  ACUTE bronchitis   due to rsv ", "j20"),                      # 8 exact duplicate of 1
        line(long_text),                                                      # 9 kept
        line(near_copy),                                                      # 10 near duplicate of 9
        line("Essential (primary) hypertension", "I10"),                      # 11 leaks test exactly
        line(dev_text.replace("what is", "what's"), "J20"),                   # 12 leaks dev nearly
    ]
    train = tmp_path / "train.jsonl"
    train.write_bytes(b"".join(rows))
    dev = tmp_path / "dev.jsonl"
    dev.write_bytes(line(dev_text, "J20"))
    test = tmp_path / "test.jsonl"
    test.write_bytes(line("Essential (primary) hypertension", "I10"))
    return {"train_file": str(train), "dev_file": str(dev), "test_file": str(test)}


def test_planted_defects_give_exact_counts_and_locations(tiny_recipe, tmp_path):
    files = planted(tmp_path)
    recipe = load_recipe(tiny_recipe(data={**files, "max_length": 128}))
    out = api.data(recipe)
    manifest = json.loads((out / "manifest.json").read_text())
    train = manifest["quality"]["splits"]["train"]
    assert train["input"] == 12 and train["kept"] == 2
    assert train["dropped"] == {
        "malformed_json": 1, "invalid_utf8": 1, "missing_field": 1, "empty_field": 1, "role_order": 1,
        "over_length": 1, "duplicate_exact": 1, "duplicate_near": 1, "leak_exact": 1, "leak_near": 1,
    }
    assert train["input"] == train["kept"] + sum(train["dropped"].values())
    path = files["train_file"]
    expected_lines = {"malformed_json": 2, "invalid_utf8": 3, "missing_field": 4, "empty_field": 5, "role_order": 6,
                      "over_length": 7, "duplicate_exact": 8, "duplicate_near": 10, "leak_exact": 11, "leak_near": 12}
    examples = manifest["quality"]["examples"]
    for reason, number in expected_lines.items():
        assert examples[reason] == [examples[reason][0]] and examples[reason][0].startswith(f"{path}:{number}: ")
    assert f"same text as {path}:1" in examples["duplicate_exact"][0]
    assert f"near-duplicate of {path}:9" in examples["duplicate_near"][0]
    assert "eval record" in examples["leak_exact"][0] and "test.jsonl:1" in examples["leak_exact"][0]
    kept = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert [r["meta"]["source"] for r in kept] == [f"{path}:1", f"{path}:9"]
    report = (out / "report.md").read_text()
    assert "| train | 12 | 2 |" in report and f"{path}:7" in report


def test_strict_mode_stops_at_the_first_problem_with_file_and_line(tiny_recipe, tmp_path):
    files = planted(tmp_path)
    recipe = load_recipe(tiny_recipe(data={**files, "max_length": 128, "quality": {"strict": True}}))
    with pytest.raises(InputError, match=rf"{files['train_file']}:2: not valid JSON"):
        api.data(recipe)


def test_overlong_policies(tiny_recipe, tmp_path):
    train = tmp_path / "t.jsonl"
    train.write_bytes(line("short", "a") + line("word " * 300, "b"))
    base = {"train_file": str(train), "dev_file": None, "test_file": None, "max_length": 64}
    kept = json.loads((api.data(load_recipe(tiny_recipe(data={**base, "quality": {"overlong": "truncate"}})))
                       / "manifest.json").read_text())["quality"]["splits"]["train"]
    assert kept["kept"] == 2 and kept["changed"] == {"truncated": 1}
    with pytest.raises(InputError, match=rf"{train}:2: \d+ tokens, over data.max_length=64"):
        api.data(load_recipe(tiny_recipe(data={**base, "quality": {"overlong": "raise"}})))


def test_json_csv_and_folders_load_with_locations(tiny_recipe, tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps([{"instruction": "q1", "output": "a1"}, {"instruction": "q2"}]))
    with (folder / "b.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["instruction", "output"])
        writer.writerow(["q3", "a3"])
        writer.writerow(["q4\nwith a second line", "a4"])
        writer.writerow(["q5", ""])
    recipe = load_recipe(tiny_recipe(data={"train_file": str(folder), "dev_file": None, "test_file": None}))
    out = api.data(recipe)
    quality = json.loads((out / "manifest.json").read_text())["quality"]
    assert quality["splits"]["train"] == {"input": 5, "kept": 3, "dropped": {"missing_field": 2}, "changed": {}}
    assert quality["examples"]["missing_field"] == [f"{folder / 'a.json'}[1]: missing field 'output'",
                                                    f"{folder / 'b.csv'}:5: missing field 'output'"]


def test_chinese_near_duplicates_use_character_shingles():
    from dstune.data.quality import TextIndex

    index = TextIndex("near", 0.8)
    text = "患者今晨爬楼梯后出现胸痛并向左臂放射，伴有气短和出汗，既往有高血压病史十年，长期服用降压药物控制"
    index.add([text], ["a"])
    other = "糖尿病患者血糖控制不佳，需调整胰岛素剂量并复查糖化血红蛋白"
    assert index.match([text[:-1] + "。", other], ["b", "c"], add=False) == [("near", "a"), None]


def test_near_duplicates_within_one_batch_keep_the_first_copy():
    from dstune.data.quality import TextIndex

    base = " ".join(WORDS)
    texts = [base, "something else entirely about the weather in spring", base.replace("today", "tonight"),
             base.upper()]
    index = TextIndex("near", 0.8)
    assert index.match(texts, ["1", "2", "3", "4"], add=True) == [None, None, ("near", "1"), ("exact", "1")]
    # The next batch is checked against the index the first one built.
    assert index.match([base.replace("lunch", "dinner")], ["5"], add=True) == [("near", "1")]


def test_minhash_signatures_estimate_jaccard_similarity():
    import numpy as np

    from dstune.data.quality import MinHasher, shingles

    a = " ".join(WORDS)
    b = " ".join(WORDS[:30] + ["x"] * 5 + WORDS[35:])
    truth = len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))
    sig = MinHasher(256).signatures([a, b, a])
    assert (sig[0] == sig[2]).all()
    assert abs(float(np.mean(sig[0] == sig[1])) - truth) < 0.1


def test_the_report_lists_the_closest_kept_pairs_below_the_threshold(tiny_recipe, tmp_path):
    """A one-word edit of a 17-word description (word 3-gram Jaccard 0.67) is kept at 0.8, and shown as almost flagged."""
    text = "the patient presented with acute chest pain radiating to the left arm and jaw after exertion today"
    train = tmp_path / "train.jsonl"
    train.write_bytes(line(text, "I20") + line(text.replace("acute", "severe"), "I20")
                      + line("type 2 diabetes mellitus without complications", "E11"))
    out = api.data(load_recipe(tiny_recipe(name="pairs", data={"train_file": str(train), "dev_file": None,
                                                                "test_file": None, "max_length": 128})))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["train"] == 3  # kept: below the 0.8 threshold
    [pair] = manifest["quality"]["closest_pairs"]["train"]
    assert (pair["record"], pair["closest_to"]) == (f"{train}:2", f"{train}:1")
    assert 0.5 < pair["similarity"] < 0.8
    report = (out / "report.md").read_text()
    assert "## Closest kept pairs" in report and f"| train | {pair['similarity']:.3f} | `{train}:2` |" in report
