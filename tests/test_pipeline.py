import json
import subprocess
import sys

import yaml

from dstune import api
from dstune.config import load_recipe


def test_run_writes_report_with_base_and_tuned(tiny_recipe):
    recipe = load_recipe(tiny_recipe(train={"max_steps": 8, "eval_steps": 4},
                                     eval={"metrics": ["exact_match", "valid_icd10"]}))
    report = api.run(recipe)
    run_dir = recipe.run_dir
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert set(report["metrics"]) == {"exact_match", "valid_icd10"}
    for row in report["metrics"].values():
        assert 0 <= row["base"] <= 1 and 0 <= row["tuned"] <= 1
        assert abs(row["delta"] - (row["tuned"] - row["base"])) < 1e-12
    assert report["training"]["trainable_percent"] > 0
    assert report["training"]["tokens_per_second"] > 0
    assert report["test_samples"] == 4
    markdown = (run_dir / "report.md").read_text()
    assert "| exact_match |" in markdown and "trainable parameters" in markdown
    for name in ("data/train.jsonl", "data/manifest.json", "eval/base.json", "eval/tuned.json",
                 "adapter/adapter_model.safetensors", "merged/config.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    predictions = json.loads((run_dir / "eval" / "tuned.json").read_text())["predictions"]
    assert len(predictions) == 4 and {"id", "expected", "got"} <= set(predictions[0])


def test_cli_eval_and_chat_on_trained_adapter(tiny_recipe, tmp_path):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe(train={"max_steps": 2})))
    api.train(str(recipe_path))
    adapter = tmp_path / "runs" / "tiny" / "adapter"
    proc = subprocess.run([sys.executable, "-m", "dstune", "eval", str(recipe_path), "--adapter", str(adapter)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("exact_match: ")
    assert (tmp_path / "runs" / "tiny" / "eval" / "adapter.json").is_file()
    proc = subprocess.run([sys.executable, "-m", "dstune", "chat", str(recipe_path), "--adapter", str(adapter),
                           "--max-new-tokens", "3"], input="colour of item 1\n", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1


def test_data_file_error_is_one_line_exit_2_in_strict_mode_and_counted_otherwise(tiny_recipe, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q"}\n')
    recipe = tiny_recipe(data={"train_file": str(bad), "quality": {"strict": True}})
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "dstune", "data", str(recipe_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"dstune: error: {bad}:2: missing field 'output' (data.quality.strict is on)"
    proc = subprocess.run([sys.executable, "-m", "dstune", "data", str(recipe_path), "data.quality.strict=false"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "runs" / "tiny" / "data" / "report.md").read_text()
    assert f"{bad}:2: missing field 'output'" in report


def test_throughput_excludes_dev_evaluation(tiny_recipe):
    recipe = load_recipe(tiny_recipe(train={"max_steps": 4, "eval_steps": 2}))
    summary = api.train(recipe).summary
    evals = [e["eval_runtime"] for e in summary["log_history"] if "eval_runtime" in e]
    # each eval_runtime is rounded to 1 ms and their sum to 10 ms: 0.126 + 0.119 may be 0.25 or 0.24
    assert len(evals) == 2 and abs(summary["dev_eval_seconds"] - sum(evals)) <= 0.005 + 0.001
    step_seconds = summary["train_seconds"] - summary["dev_eval_seconds"]
    expected = summary["tokens"] / step_seconds
    rounding = expected * 0.01 / step_seconds + 0.01  # both times are rounded to 0.01 s
    assert abs(summary["tokens_per_second"] - expected) <= rounding


def test_eval_gives_the_same_answers_on_adapter_and_merged_directory(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe(train={"max_steps": 3}, eval={"bootstrap_samples": 50}))
    trained = api.train(recipe)
    merged = api.merge(recipe, adapter=trained.adapter_dir)
    on_adapter = api.evaluate(recipe, adapter=trained.adapter_dir)
    on_merged = api.evaluate(recipe, model=merged)
    # fp32 merge: the same weights, so the same greedy answers and the same scores and CIs.
    assert [p["got"] for p in on_adapter["predictions"]] == [p["got"] for p in on_merged["predictions"]]
    assert on_adapter["metrics"] == on_merged["metrics"] and on_adapter["ci"] == on_merged["ci"]
