"""Provenance: every manifest records the resolved recipe, versions and commit, and a report alone re-runs its run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dstune import api
from dstune.cli.main import main
from dstune.config import load_recipe
from dstune.data.build import with_data_defaults
from dstune.errors import InputError
from dstune.provenance import LIBRARIES, git_state, load_recipe_or_manifest, provenance, recipe_from_manifest

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
# Every manifest a run with an export writes, relative to its run folder.
MANIFESTS = ("data/manifest.json", "merged/dstune_export.json", "exports/torchao-int8/dstune_export.json",
             "report.json")


def check_provenance(record: dict, recipe) -> None:
    assert record["recipe"] == recipe.model_dump(mode="json")
    assert record["dstune"] == __import__("dstune").__version__
    assert set(record["git"]) == {"commit", "dirty"}
    assert set(record["versions"]) == {"python", *LIBRARIES} and all(record["versions"].values())


def test_a_report_alone_reruns_its_run_bit_for_bit(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe(train={"max_steps": 2}, eval={"max_samples": 2, "bootstrap_samples": 10},
                                     export={"formats": ["torchao:int8"], "min_retention": 0.01}))
    api.run(recipe)
    first = recipe.run_dir
    # The recipe names no eval.metrics: the data stage chose them (dstune.evaluate.choice), and the later stages
    # record the recipe they ran, with the choice written out; the dataset records the recipe it was given.
    resolved = with_data_defaults(recipe)
    assert resolved.eval.metrics == ["exact_match", "contains_answer"]
    for name in MANIFESTS:
        check_provenance(json.loads((first / name).read_text())["provenance"],
                         recipe if name.startswith("data/") else resolved)
    assert "## Provenance" in (first / "report.md").read_text()
    assert "train.lora.r=4" in (first / "report.html").read_text()

    # Only the report: the recipe YAML is gone, and the new run folder is named on the command line.
    assert main(["run", str(first / "report.json"), "name=again"]) == 0
    again = first.parent / "again"
    rerun = json.loads((again / "report.json").read_text())["provenance"]["recipe"]
    assert rerun == {**resolved.model_dump(mode="json"), "name": "again"}
    a, b = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (first, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].any() for k in a if "lora_B" in k)  # trained: LoRA's B starts at zero


def test_every_shipped_recipe_survives_the_round_trip_through_a_manifest(tmp_path):
    for path in RECIPES:
        recipe = load_recipe(path)
        manifest = tmp_path / f"{path.stem}.json"
        manifest.write_text(json.dumps({"stage": "data", "provenance": provenance(recipe)}))
        assert load_recipe_or_manifest(manifest) == recipe, path.name
        assert load_recipe_or_manifest(manifest, ["train.seed=7"]).train.seed == 7


def test_manifest_errors_name_the_file(tmp_path):
    old = tmp_path / "report.json"
    old.write_text(json.dumps({"schema": "dstune.report/3", "recipe": "icd10_lora"}))
    with pytest.raises(InputError, match=r"report.json: no provenance.recipe"):
        recipe_from_manifest(old)
    with pytest.raises(InputError, match=r"report.json: no provenance.recipe"):
        load_recipe_or_manifest(old)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"provenance": {"recipe": {"name": "x", "trian": {}}}}))
    with pytest.raises(InputError, match=r"manifest.json \(provenance.recipe\): unknown key 'trian' \(did you mean"):
        load_recipe_or_manifest(manifest)
    # A recipe written as JSON is still a recipe (JSON is YAML).
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"name": "plain", "train": {"seed": 3}}))
    assert load_recipe_or_manifest(plain).train.seed == 3


def test_git_state_is_null_outside_a_checkout(monkeypatch, tmp_path):
    git_state.cache_clear()
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on the PATH
    try:
        assert git_state() == {"commit": None, "dirty": None}
    finally:
        git_state.cache_clear()
