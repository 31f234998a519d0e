"""`dstune export` and the export step of `dstune run`: the artifact is scored against fp32 and gated (exit 3)."""

from __future__ import annotations

import json

import yaml
from cli_runner import run_cli

from dstune import api
from dstune.config import load_recipe


def test_export_scores_against_fp32_and_the_gate_exits_3(tiny_recipe, tmp_path):
    recipe = tiny_recipe(train={"max_steps": 2})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "runs" / "tiny"
    early, = run_cli([["export", str(path), "--format", "torchao", "--quant", "int8"]])
    assert early.returncode == 2 and "no merged model" in early.stderr, early.stderr[-2000:]
    api.train(str(path))
    api.merge(str(path))
    passed, failed, unknown = run_cli([
        ["export", str(path), "--format", "torchao", "--quant", "int8", "export.min_retention=0.01"],
        ["export", str(path), "--format", "torchao", "--quant", "int8", "export.min_retention=5"],
        ["export", str(path), "--format", "onnx", "--quant", "int3"],
    ])
    assert passed.returncode == 0, passed.stderr[-3000:]
    assert "torchao:int8 written to" in passed.stdout and "gate 0.01: passed" in passed.stdout
    record = json.loads((run_dir / "exports" / "torchao-int8" / "dstune_export.json").read_text())
    assert record["passed"] is False and record["min_retention"] == 5  # the second run's record
    assert 0 < record["size_ratio"] < 1 and record["fp32_bytes"] > record["bytes"]
    scored = json.loads((run_dir / "eval" / "export-torchao-int8.json").read_text())
    assert record["score"] == scored["metrics"]["exact_match"] and len(scored["predictions"]) == 4
    assert record["retention"] == (record["score"] / record["fp32_score"] if record["fp32_score"] else 1.0)
    assert failed.returncode == 3
    assert "dstune: error: export below export.min_retention=5.0: torchao:int8 keeps" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert unknown.returncode == 2 and ("'onnx' writes fp32, int8, int4, int4-rtn, int4-gptq, int4-awq, int4-awq-gptq, "
                                        "int4-mixed, int4-gptq-mixed, int4-ort-hqq, int4-ort-kquant, not 'int3'"
                                        in unknown.stderr)


def test_run_exports_reports_and_gates(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe(train={"max_steps": 2},
                                     export={"formats": ["torchao:int8"], "min_retention": 0.01}))
    report = api.run(recipe)
    row, = report["exports"]
    assert (row["format"], row["quant"], row["passed"]) == ("torchao", "int8", True)
    assert report["artifacts"]["export torchao:int8"] == row["artifact"]
    markdown = (recipe.run_dir / "report.md").read_text()
    assert "| torchao:int8 |" in markdown and "passed (min 0.01)" in markdown
    assert markdown.count("data:image/png") == 0 and "data:image/png" in (recipe.run_dir / "report.html").read_text()
