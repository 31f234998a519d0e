"""Domains as plugins: a toy arithmetic domain from an installed package (tests/plugins), whose source, metric and
verifier reach dstune through entry points only, runs through the CLI like the ICD-10 demo; no generic module
imports a domain."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import dstune
from cli_runner import shared_runner
from dstune.config import recipe_model
from dstune.plugins import METRICS, SOURCES, VERIFIERS

PACKAGE = Path(dstune.__file__).parent
ROOT = Path(__file__).parents[1]
NOT_INSTALLED = "the test plugins are not installed: pip install --no-deps -e tests/plugins (`make setup` does)"


def toy_recipe(tmp_path, model_dir) -> Path:
    """A recipe of the toy domain: 40 sums, a tiny Llama, the domain's metric and verifier in the evaluation."""
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({
        "name": "toy", "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(model_dir)},
        "data": {"source": "toy_arith", "toy_arith": {"n": 40, "seed": 0}, "max_length": 64},
        "train": {"learning_rate": 1e-2, "max_steps": 2, "batch_size": 4, "eval_steps": 0, "logging_steps": 1,
                  "lora": {"r": 4, "alpha": 8}},
        "eval": {"metrics": ["numeric_close", "exact_match"], "batch_size": 8, "max_new_tokens": 4, "cache": False,
                 "bootstrap_samples": 20,
                 "checks": [{"kind": "verifier", "name": "integer", "verifier": "is_integer"}]},
    }))
    return path


def test_the_toy_domain_registers_through_entry_points():
    assert "toy_arith" in SOURCES, NOT_INSTALLED
    assert type(SOURCES["toy_arith"]).__module__ == "dstune_test_plugins.toy_domain"
    assert METRICS["numeric_close"](["5", "about 7", "x"], ["5", "8", "3"]) == pytest.approx(2 / 3)
    assert VERIFIERS["is_integer"]("12", {}) and not VERIFIERS["is_integer"]("12 apples", {})
    section = recipe_model().model_fields["data"].annotation.model_fields["toy_arith"]
    assert section.annotation is type(SOURCES["toy_arith"]).options


def test_toy_domain_data_and_run_through_the_cli(tmp_path, tiny_model_dirs):
    assert "toy_arith" in SOURCES, NOT_INSTALLED
    recipe = toy_recipe(tmp_path, tiny_model_dirs["llama"])
    run_dir = tmp_path / "runs" / "toy"
    data = shared_runner()(["data", str(recipe)])
    assert data.returncode == 0, data.stderr
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert manifest["source"] == "toy_arith" and manifest["sums"] == 40
    assert manifest["counts"] == {"dev": 4, "test": 4, "train": 32}
    for line in (run_dir / "data" / "train.jsonl").read_text().splitlines():
        question, answer = (m["content"] for m in json.loads(line)["messages"])
        a, b = map(int, re.fullmatch(r"(\d+)\+(\d+)", question).groups())
        assert int(answer) == a + b

    run = shared_runner()(["run", str(recipe)])
    assert run.returncode == 0, run.stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["metrics"]) == {"numeric_close", "exact_match"}
    assert 0 <= report["metrics"]["numeric_close"]["tuned"] <= 1
    assert set(report["checks"]["tuned"]["pass_rates"]) == {"integer"}
    assert "| numeric_close |" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize("override, message", [
    ("data.source=toy_arth", "unknown value 'toy_arth' for data.source (did you mean 'toy_arith'?); choose from "),
    ("eval.metrics=[numeric_clos]", "unknown value 'numeric_clos' for eval.metrics (did you mean 'numeric_close'?)"),
    ("eval.checks=[{kind: verifier, verifier: is_integr}]",
     "unknown value 'is_integr' for eval.checks[0].verifier (did you mean 'is_integer'?)"),
    ("data.toy_arith.nn=3", "unknown key 'data.toy_arith.nn' (did you mean 'n'?)"),
    ("data.toy_arith.n=2", "data.toy_arith.n: Input should be greater than or equal to 3 (got 2)"),
])
def test_unknown_domain_names_are_one_line_errors_exit_2(tmp_path, tiny_model_dirs, override, message):
    assert "toy_arith" in SOURCES, NOT_INSTALLED
    recipe = toy_recipe(tmp_path, tiny_model_dirs["llama"])
    result = shared_runner()(["data", str(recipe), override])
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"dstune: error: {recipe}: "), result.stderr
    assert message in result.stderr
    assert not (tmp_path / "runs").exists()


def test_no_generic_module_imports_a_domain():
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "domains":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any("domains" in name.split(".") for name in names), f"{path}:{node.lineno} imports a domain"


@pytest.mark.parametrize("first", ["dstune.data.sources", "dstune.evaluate.metrics", "dstune.domains.icd10"])
def test_modules_import_in_any_order(first):
    # config.py imported the registries that imported the ICD-10 module that imported config.py.
    code = f"import {first}; from dstune.config import load_recipe; load_recipe('recipes/icd10_lora.yaml')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
