"""The k-shot in-context baseline: exactly k training demonstrations per prompt, never an evaluated record,
deterministic per seed; `similar` finds the true nearest neighbours; a run reports it beside base and tuned."""

import json

import numpy as np
import pytest

from cli_runner import run_cli
from dstune import api
from dstune.config import load_recipe
from dstune.errors import InputError
from dstune.evaluate.fewshot import (demonstration_pool, few_shot_records, nearest_neighbour_answers,
                                     similar_demonstrations)


def chat(rid, question, answer, **meta):
    return {"id": rid, "messages": [{"role": "system", "content": "Answer with one word."},
                                    {"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "meta": meta}


TRAIN = [chat(f"t{i}", f"what colour is fruit number {i}", ["red", "green", "blue"][i % 3]) for i in range(20)]
TEST = [chat(f"q{i}", f"which colour has the fruit {i + 100}", "red") for i in range(6)]


def questions(record):
    return [t["content"] for t in record["messages"] if t["role"] == "user"]


@pytest.mark.parametrize("select", ["random", "similar"])
def test_prompts_hold_exactly_k_training_examples_and_are_deterministic(select):
    pool = demonstration_pool(TRAIN, TEST)
    shots, shown = few_shot_records(pool, TEST, 3, select, seed=7)
    train_questions = {questions(r)[0]: r["messages"][-1]["content"] for r in TRAIN}
    for record, shot in zip(TEST, shots):
        turns = shot["messages"]
        assert turns[0] == record["messages"][0]  # the record's own system prompt, once, first
        assert [t["role"] for t in turns[1:]] == ["user", "assistant"] * 3 + ["user", "assistant"]
        assert turns[-2:] == record["messages"][-2:]  # the question last, and its reference answer
        demos = turns[1:-2]
        assert len(shown[record["id"]]) == 3 and len(set(shown[record["id"]])) == 3
        for user, assistant in zip(demos[::2], demos[1::2]):
            assert train_questions[user["content"]] == assistant["content"]  # a whole training example
        assert not {t["id"] for t in TEST} & set(shown[record["id"]])
    again, shown_again = few_shot_records(pool, list(reversed(TEST)), 3, select, seed=7)
    assert {k: v for k, v in shown_again.items()} == shown  # per question, whatever the order
    if select == "random":
        _, other = few_shot_records(pool, TEST, 3, select, seed=8)
        assert other != shown


def test_the_pool_never_holds_an_evaluated_record_and_counts_what_it_leaves_out():
    leaked = chat("t-copy", TEST[0]["messages"][1]["content"], "red")  # an exact copy of a test question
    near = chat("t-near", TEST[1]["messages"][1]["content"] + "!", "red")
    same_id = chat("q2", "another question", "blue")
    augmented = chat("t0#aug1", "what colour is fruit number 0 ", "red", augmented_from="t0")
    replay = chat("g1", "capital of France", "Paris", replay=True)
    pool = demonstration_pool(TRAIN + [leaked, near, same_id, augmented, replay], TEST, "near", 0.8)
    ids = {r["id"] for r in pool.records}
    assert ids == {r["id"] for r in TRAIN}
    assert pool.books() == {"source_records": 23, "not_source": 2, "kept": 20,
                            "dropped": {"same_id_as_eval": 1, "leakage_exact": 1, "leakage_near": 1}}
    # leakage "none" in the recipe still never shows an evaluated record: exact copies go
    assert "t-copy" not in {r["id"] for r in demonstration_pool(TRAIN + [leaked], TEST, "none").records}
    with pytest.raises(InputError, match="eval.few_shot.k: 21 demonstrations wanted, but the pool has 20"):
        few_shot_records(pool, TEST, 21, "random", 0)


def test_similar_returns_the_true_nearest_neighbours():
    pool = ["chronic kidney disease stage 3", "acute bronchitis due to virus", "type 2 diabetes with neuropathy",
            "essential hypertension", "acute kidney failure", "type 1 diabetes without complications"]
    queries = ["type 2 diabetes with kidney neuropathy", "acute viral bronchitis", "hypertension, essential"]
    picks = similar_demonstrations(pool, queries, 2)
    assert picks[0][-1] == 2 and picks[1][-1] == 1 and picks[2][-1] == 3  # the nearest is last
    # the same order as brute-force cosine similarity over the same TF-IDF vectors
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectors = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4)).fit(pool)
    p, q = vectors.transform(pool).toarray(), vectors.transform(queries).toarray()
    cosine = (q @ p.T) / np.outer(np.linalg.norm(q, axis=1), np.linalg.norm(p, axis=1))
    for row, pick in zip(cosine, picks):
        assert pick == list(reversed(np.argsort(-row, kind="stable")[:2].tolist()))
    # a 1-NN classifier with no language model answers with its nearest record's answer
    records = [chat(str(i), text, f"A{i}") for i, text in enumerate(pool)]
    answers = nearest_neighbour_answers(demonstration_pool(records, []), [chat("x", queries[1], "?")])
    assert answers == ["A1"]


def test_a_run_reports_the_k_shot_base_next_to_zero_shot_and_tuned(tiny_recipe, tmp_path):
    raw = tiny_recipe(name="shots", eval={"few_shot": {"k": 2, "select": "similar"}, "bootstrap_samples": 50})
    report = api.run(load_recipe(raw))
    run_dir = tmp_path / "runs" / "shots"
    saved = json.loads((run_dir / "eval" / "base-2shot-similar.json").read_text())
    train_ids = {json.loads(line)["id"] for line in (run_dir / "data" / "train.jsonl").read_text().splitlines()}
    test_ids = {p["id"] for p in saved["predictions"]}
    assert saved["samples"] == len(test_ids) == report["test_samples"]
    assert all(len(d) == 2 and set(d) <= train_ids for d in saved["few_shot"]["demonstrations"].values())
    section = report["few_shot"]
    assert section["label"] == "2-shot similar" and set(section["paired"]) == set(report["metrics"])
    # k-shot pays at every request: its prompts are longer than zero-shot's
    tokens = section["prompt_tokens_mean"]
    assert tokens["few_shot"] > tokens["base"] == tokens["tuned"] > 0
    markdown = (run_dir / "report.md").read_text()
    assert "| in-context baseline | base 0-shot | base 2-shot similar | tuned | tuned vs 2-shot similar |" in markdown

    # `dstune eval` scores any model that way, from a key=value override
    recipe_file = tmp_path / "shots.yaml"
    raw["eval"].pop("few_shot")
    recipe_file.write_text(json.dumps(raw))
    [cli] = run_cli([["eval", str(recipe_file), "eval.few_shot.k=3", "--adapter", str(run_dir / "adapter")]])
    assert cli.returncode == 0, cli.stderr
    saved = json.loads((run_dir / "eval" / "adapter-3shot-random.json").read_text())
    assert {len(d) for d in saved["few_shot"]["demonstrations"].values()} == {3}


def test_curve_sizes_count_source_records_per_stratum_and_nest():
    from dstune.curve import parse_sizes, subsets, training_split

    train = [chat(f"r{i}", f"q{i}", "x", category=f"C{i % 4}") for i in range(14)]  # strata of 4, 4, 3, 3
    train += [chat("r0#aug1", "q0 again", "x", category="C0", augmented_from="r0"),
              chat("g0", "general", "y", replay=True), chat("g1", "general 2", "y", replay=True)]
    sizes = parse_sizes("4,1,all,2")
    assert sizes == [1, 2, 4, None]
    cut = subsets(train, sizes, lambda r: r["meta"]["category"], seed=3)
    for size in sizes:
        books, chosen = cut[size]["books"], cut[size]["records"]
        per = {}
        for record in chosen:
            per[record["meta"]["category"]] = per.get(record["meta"]["category"], 0) + 1
        assert all(n == min(size or 99, avail) for n, avail in zip(
            [per[c] for c in ("C0", "C1", "C2", "C3")], (4, 4, 3, 3)))
        assert books["source_records"] == len(chosen) == books["expected"]
        assert not any("augmented_from" in r["meta"] or r["meta"].get("replay") for r in chosen)
    assert cut[4]["books"]["short_strata"] == 2 and cut[None]["books"]["source_records"] == 14
    ids = [{r["id"] for r in cut[s]["records"]} for s in sizes]
    assert ids[0] < ids[1] < ids[2] <= ids[3]  # each size holds the smaller ones
    assert cut[2]["records"] == subsets(train, sizes, lambda r: r["meta"]["category"], seed=3)[2]["records"]
    # augmented copies of chosen records and replay at the recipe's ratio come along, counted apart
    with_r0 = [r for r in cut[None]["records"]]
    records, extra = training_split(train, with_r0)
    assert extra == {"augmented_copies": 1, "replay": 2} and len(records) == 17


def test_min_steps_trains_a_small_set_for_that_many_steps(tiny_recipe):
    from dstune.train.loop import train

    raw = tiny_recipe(name="few", train={"max_steps": -1, "epochs": 1, "min_steps": 7, "batch_size": 8})
    data_dir = api.data(load_recipe(raw))
    result = train(load_recipe(raw), data_dir)
    per_epoch = -(-len((data_dir / "train.jsonl").read_text().splitlines()) // 8)
    assert per_epoch < 7  # one epoch would be fewer steps than the floor
    assert result.summary["optimizer_steps"] == 7 and result.summary["max_steps_from"] == "train.min_steps"
    assert result.summary["epochs"] == round(7 / per_epoch, 3)


def test_curve_arguments_fail_before_anything_runs(tiny_recipe, tmp_path):
    raw = tiny_recipe(name="bad_curve")
    recipe_file = tmp_path / "bad_curve.yaml"
    recipe_file.write_text(json.dumps(raw))
    cases = [["--sizes", "1,two"], ["--methods", "lora,prefx"], ["--per", "stratum"], ["--shots", "nearest"]]
    results = run_cli([["curve", str(recipe_file), *case] for case in cases])
    messages = ["--sizes: 'two' is not a positive whole number", "did you mean 'prefix'",
                "--per stratum: the recipe names no strata", "--shots: 'nearest' is not one of"]
    for result, message in zip(results, messages):
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "runs" / "bad_curve").exists()


def test_a_k_larger_than_the_pool_fails_before_any_model_loads(tiny_recipe, monkeypatch, tmp_path):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the pool was checked")

    monkeypatch.setattr(api, "load", no_load)
    recipe = load_recipe(tiny_recipe(name="big_k", eval={"few_shot": {"k": 40}}))
    test_file = tmp_path / "cases.jsonl"
    test_file.write_text(json.dumps({"instruction": "colour of item 99", "output": "red"}) + "\n")
    for call in (lambda: api.run(recipe), lambda: api.evaluate(recipe), lambda: api.evaluate(recipe, test_file=test_file)):
        with pytest.raises(InputError, match="eval.few_shot.k: 40 demonstrations wanted, but the pool has 1[0-9] "):
            call()
