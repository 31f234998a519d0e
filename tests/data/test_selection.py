"""The selection of the training split: adversarial validation, general replay, and the data report."""

import json
import random

import numpy as np
import pytest

from dstune import api
from dstune.config import load_recipe
from dstune.data.build import GENERAL_SET, GENERAL_TEST
from dstune.data.domain import domain_scores
from dstune.data.formats import read_samples

MEDICAL = ["fever", "cough", "dyspnoea", "hypertension", "insulin", "tachycardia", "pneumonia", "stenosis",
           "angina", "oedema", "haemorrhage", "thrombosis", "asthma", "infarction", "arrhythmia", "sepsis"]
SPORTS = ["football", "goal", "referee", "league", "striker", "penalty", "stadium", "season", "coach", "match",
          "champion", "tournament", "keeper", "transfer", "derby", "fans"]


def sentence(rng, words, n=8):
    return " ".join(rng.choice(words) for _ in range(n))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def test_domain_scores_separate_off_domain_candidates():
    rng = random.Random(0)
    reference = [sentence(rng, MEDICAL) for _ in range(60)]
    candidates = [sentence(rng, MEDICAL) for _ in range(60)] + [sentence(rng, SPORTS) for _ in range(20)]
    scores, stats = domain_scores(candidates, reference)
    # The classifier tells sports from medicine, but not medicine from medicine: scores order by domain.
    assert scores[60:].max() < np.median(scores[:60])
    assert 0.55 < stats["auc"] < 0.95 and len(stats["auc_folds"]) == 5
    same, same_stats = domain_scores([sentence(rng, MEDICAL) for _ in range(60)], reference)
    assert same_stats["auc"] < stats["auc"]


def test_adversarial_filter_drops_off_domain_records_and_reports_them(tiny_recipe, tmp_path):
    rng = random.Random(1)
    train = [{"instruction": sentence(rng, MEDICAL), "output": "J20"} for _ in range(40)]
    train += [{"instruction": sentence(rng, SPORTS), "output": "J20"} for _ in range(8)]
    reference = [{"text": sentence(rng, MEDICAL, 12)} for _ in range(40)]
    data = {"train_file": write_jsonl(tmp_path / "train.jsonl", train), "dev_file": None, "test_file": None,
            "adversarial": {"reference": write_jsonl(tmp_path / "ref.jsonl", reference), "quantile": 8 / 48,
                            "examples": 3}}
    out = api.data(load_recipe(tiny_recipe(data=data)))
    manifest = json.loads((out / "manifest.json").read_text())
    adv = manifest["adversarial"]
    assert adv["dropped"] == 8 and adv["kept"] == 40 and adv["reference"] == 40 and adv["candidates"] == 48
    assert manifest["quality"]["splits"]["train"]["dropped"] == {"off_domain": 8}
    kept = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert all(any(w in r["messages"][0]["content"] for w in MEDICAL) for r in kept)
    dropped_lines = {int(e["where"].rsplit(":", 1)[1]) for e in adv["highest_dropped"]}
    assert dropped_lines <= set(range(41, 49)) and len(adv["lowest_kept"]) == 3
    assert adv["lowest_kept"][0]["score"] >= adv["threshold"] > adv["highest_dropped"][0]["score"]
    report = (out / "report.md").read_text()
    assert f"AUC {adv['auc']}" in report and "Highest-scoring dropped" in report


def test_general_set_is_valid_and_licensed():
    samples = list(read_samples(GENERAL_SET))
    assert len(samples) >= 300
    assert len({s["id"] for s in samples}) == len(samples)
    questions = [s["messages"][0]["content"] for s in samples]
    assert len(set(questions)) == len(questions)
    assert {s["meta"]["lang"] for s in samples} == {"en", "zh"}
    assert "Apache-2.0" in (GENERAL_SET.parent / "README.md").read_text()


def test_replay_mixes_general_records_with_balanced_books(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe(data={"replay": {"ratio": 0.5}, "max_length": 128}))
    out = api.data(recipe)
    manifest = json.loads((out / "manifest.json").read_text())
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    replayed = [r for r in train if r["meta"].get("replay")]
    assert manifest["replay"]["wanted"] == 8 and len(replayed) == 8 and len(train) == 16 + 8
    # No domain system prompt on general records; books: the replay pool = mixed in + not sampled + dropped.
    books = manifest["quality"]["splits"]
    assert books["train"]["added"] == {"replay": 8} and books["train"]["kept"] == 16
    assert books["replay"]["kept"] == 8
    assert books["replay"]["input"] == 8 + sum(books["replay"]["dropped"].values())
    # By default the replay part of the shipped set, never the held-out tier-1 questions.
    assert manifest["replay"]["file"] == str(GENERAL_SET) and books["replay"]["input"] == sum(1 for _ in GENERAL_SET.open())
    heldout = {r["messages"][0]["content"] for r in read_samples(GENERAL_TEST)}
    assert not {r["messages"][0]["content"] for r in replayed} & heldout


def test_report_html_has_plots_and_length_stats(tiny_recipe):
    out = api.data(load_recipe(tiny_recipe(data={"max_length": 128})))
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["lengths"]) == {"train", "dev", "test"}
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    lengths = manifest["lengths"]["train"]
    assert lengths["count"] == len(train) == sum(lengths["histogram"]["counts"])
    assert lengths["max"] == max(r["meta"]["tokens"] for r in train)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 1 and "<table>" in html
    assert (out / "plots" / "lengths.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("fields", [{}, {"text": "content"}])
def test_raw_text_records_for_continued_pretraining(tiny_recipe, tmp_path, fields, tokenizer):
    name = fields.get("text", "text")
    rng = random.Random(2)
    rows = [{name: sentence(rng, MEDICAL, 10) + "."} for _ in range(12)]
    rows.append({name: "   "})
    data = {"train_file": write_jsonl(tmp_path / "corpus.jsonl", rows), "dev_file": None, "test_file": None,
            "fields": fields}
    recipe = load_recipe(tiny_recipe(data=data))
    out = api.data(recipe)
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert len(train) == 12 and "messages" not in train[0]
    assert train[0]["meta"]["tokens"] == len(tokenizer(train[0]["text"], add_special_tokens=False)["input_ids"]) + 1
    quality = json.loads((out / "manifest.json").read_text())["quality"]
    assert quality["splits"]["train"]["dropped"] == {"empty_field": 1}
    from dstune.train import train as train_stage

    result = train_stage(recipe)
    assert result.summary["train_loss"] > 0


def test_embedding_features_from_a_local_model(tiny_model_dirs):
    rng = random.Random(3)
    reference = [sentence(rng, MEDICAL) for _ in range(30)]
    candidates = [sentence(rng, MEDICAL) for _ in range(30)] + [sentence(rng, SPORTS) for _ in range(30)]
    scores, stats = domain_scores(candidates, reference, "embeddings", str(tiny_model_dirs["llama"]), folds=3)
    assert stats["features"] == "embeddings" and scores.shape == (60,)
    # Even a random tiny model's token embeddings separate the two vocabularies.
    assert scores[30:].mean() < scores[:30].mean()
