import subprocess
import sys

import pytest

from dstune.config import load_recipe
from dstune.errors import InputError


def test_unknown_key_names_path_and_closest_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntrain:\n  lerning_rate: 0.1\n")
    with pytest.raises(InputError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "train.lerning_rate" in message
    assert "did you mean 'learning_rate'" in message
    assert "\n" not in message


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(InputError, match=r"unknown key 'trian' \(did you mean 'train'\?\)"):
        load_recipe({"name": "x", "trian": {}})


def test_wrong_type_names_key():
    with pytest.raises(InputError, match=r"recipe: train.epochs: .*\(got 'many'\)"):
        load_recipe({"name": "x", "train": {"epochs": "many"}})


def test_unknown_registry_value_suggests():
    with pytest.raises(InputError) as err:
        load_recipe({"name": "x", "eval": {"metrics": ["exact_mach"]}})
    assert str(err.value).startswith("recipe: unknown value 'exact_mach' for eval.metrics (did you mean 'exact_match'?)")


@pytest.mark.parametrize("name", ["", "../elsewhere", "a/b"])
def test_run_name_must_be_a_plain_folder_name(name):
    with pytest.raises(InputError, match="recipe: name: String should match pattern"):
        load_recipe({"name": name})


def test_overrides_keep_types_and_nest():
    recipe = load_recipe({"name": "x"}, ["train.learning_rate=1e-3", "train.lora.r=4", "eval.metrics=[exact_match]"])
    assert recipe.train.learning_rate == pytest.approx(1e-3)
    assert recipe.train.lora.r == 4
    assert recipe.eval.metrics == ["exact_match"]


def test_learning_rate_as_fraction_of_pretraining():
    recipe = load_recipe({"name": "x", "train": {"pretrain_learning_rate": 3e-3}})
    assert recipe.train.resolved_learning_rate() == pytest.approx(3e-4)
    recipe = load_recipe({"name": "x", "train": {"pretrain_learning_rate": 3e-3, "lr_fraction": 0.5}})
    assert recipe.train.resolved_learning_rate() == pytest.approx(1.5e-3)
    # Neither set: the method's default (issue 25: a minimal recipe runs; this was an error that came late).
    assert load_recipe({"name": "x"}).train.learning_rate_source() == (2e-4, "the lora method's default")
    assert load_recipe({"name": "x", "train": {"method": "ia3"}}).train.resolved_learning_rate() == 3e-3


def test_demo_recipe_validates():
    recipe = load_recipe("recipes/icd10_lora.yaml")
    assert recipe.data.source == "icd10"
    assert recipe.train.resolved_learning_rate() > 0


def test_cli_bad_key_is_one_line_exit_2(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nmodel:\n  nme_or_path: y\n")
    proc = subprocess.run([sys.executable, "-m", "dstune", "data", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "model.nme_or_path" in lines[0] and "name_or_path" in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_bad_override_is_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dstune", "data", "recipes/icd10_lora.yaml", "train.epochs=lots"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.epochs" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_missing_recipe_is_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dstune", "train", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "recipe file not found" in proc.stderr


@pytest.mark.parametrize("command", [[], ["run"], ["data"], ["train"], ["eval"], ["merge"], ["chat"], ["export"],
                                     ["convert-weights"]])
def test_every_command_has_help(command):
    proc = subprocess.run([sys.executable, "-m", "dstune", *command, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "usage: dstune" in proc.stdout
    assert len(proc.stdout.splitlines()) > 5


def test_debug_flag_shows_traceback_after_subcommand(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dstune", "train", str(tmp_path / "nope.yaml"), "--debug"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "recipe file not found" in proc.stderr.splitlines()[-1]
