"""`dstune eval --test-file`: a model scored on one file, with the data checks and a report; metrics chosen from
the answers when a recipe names none, reaching early stopping and the answer length."""

import json

from cli_runner import run_cli
from dstune import api
from dstune.config import load_recipe
from dstune.data.build import with_data_defaults
from dstune.evaluate.choice import choose_metrics

LONG_ANSWER = ("患者应当在饭后服用阿司匹林，每日一次，并定期复查血常规和肝肾功能；如出现黑便、呕血或皮肤瘀斑，"
               "应立即停药并就医。同时注意控制血压和血糖，戒烟限酒，保持规律作息。")


def test_eval_on_a_single_file_needs_only_that_file(tiny_recipe, tmp_path):
    test = tmp_path / "new.jsonl"
    rows = [{"instruction": f"colour of item {i}", "output": "red"} for i in range(6)]
    rows.append(rows[0])  # a duplicate: dropped and counted
    test.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    raw = tiny_recipe(name="file_only")
    raw["data"] = {"source": "files", "max_length": 64}  # no train, dev or test file
    raw["data"]["adversarial"] = {"reference": "dev"}  # needs a dev split, which eval on a file does not
    result = api.evaluate(load_recipe(raw), test_file=test, tag="new")
    run_dir = tmp_path / "runs" / "file_only"
    assert result["samples"] == 6 and set(result["metrics"]) == {"exact_match", "contains_answer"}
    books = result["data"]["quality"]["splits"]["test"]
    assert books["input"] == 8 and books["kept"] == 6 and sum(books["dropped"].values()) == 2
    assert not (run_dir / "data").exists()  # no dataset was built
    assert json.loads((run_dir / "eval" / "new.json").read_text())["samples"] == 6
    report = (run_dir / "eval" / "new" / "report.md").read_text()
    assert f"Test file: `{test}`: 8 records, 6 kept" in report and (run_dir / "eval" / "new" / "report.html").is_file()

    recipe_file = tmp_path / "file_only.yaml"
    recipe_file.write_text(json.dumps(raw))  # JSON is YAML
    [cli] = run_cli([["eval", str(recipe_file), "--test-file", str(test), "--tag", "cli"]])
    assert cli.returncode == 0, cli.stderr
    assert "exact_match: " in cli.stdout and "6 of 8 records scored" in cli.stdout


def test_short_labels_get_exact_match_and_long_answers_rouge_l():
    count = lambda texts: [len(t) for t in texts]  # noqa: E731  (one token per character)
    short = choose_metrics(["J21", "E11.9", "I10"], count, 512)
    assert short["eval.metrics"] == ["exact_match", "contains_answer"] and short["train.metric"] == "exact_match"
    assert short["eval.max_new_tokens"] == 16
    long = choose_metrics([LONG_ANSWER] * 5, count, 512)
    assert long["eval.metrics"] == ["rougeL", "contains_answer"] and long["train.metric"] == "rougeL"
    assert long["eval.max_new_tokens"] >= 1.25 * len(LONG_ANSWER) and "long answers" in long["why"]


def test_metric_choice_reaches_early_stopping_and_the_answer_length(tiny_recipe, tmp_path):
    files = {}
    for split, n in (("train", 4), ("dev", 2), ("test", 2)):
        files[split] = tmp_path / f"long_{split}.jsonl"
        files[split].write_text("".join(json.dumps({"instruction": f"阿司匹林的用法 {split} {i}",
                                                    "output": LONG_ANSWER}) + "\n" for i in range(n)))
    raw = tiny_recipe(name="long", data={"train_file": str(files["train"]), "dev_file": str(files["dev"]),
                                         "test_file": str(files["test"]), "max_length": 256,
                                         "quality": {"dedup": "none", "leakage": "none"}},
                      train={"max_steps": 2, "eval_steps": 2})
    del raw["eval"]["max_new_tokens"]
    recipe = load_recipe(raw)
    out = api.data(recipe)
    choice = json.loads((out / "manifest.json").read_text())["metric_choice"]
    assert choice["applied"] == ["eval.metrics", "train.metric", "eval.max_new_tokens"]
    assert "Chosen from the answers, as the recipe sets none: eval.metrics = ['rougeL', 'contains_answer']" in (
        out / "report.md").read_text()
    resolved = with_data_defaults(recipe)
    assert resolved.eval.metrics == ["rougeL", "contains_answer"] and resolved.train.metric == "rougeL"
    assert resolved.eval.max_new_tokens == choice["eval.max_new_tokens"] > 16
    result = api.train(recipe)  # the recipe as written: the loop applies the dataset's choice itself
    assert set(result.summary["best_metric"]) == {"rougeL"}
    assert any("eval_rougeL" in entry for entry in result.summary["log_history"])
    # A recipe that names its metrics keeps them.
    named = load_recipe({**raw, "eval": {**raw["eval"], "metrics": ["exact_match"]}})
    assert with_data_defaults(named).eval.metrics == ["exact_match"]
