"""train.init_adapter / --from-adapter: a run continues a trained adapter, starting at exactly its function."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from dstune import api
from dstune.config import load_recipe
from dstune.errors import InputError


@pytest.fixture
def trained(tiny_recipe):
    """A LoRA adapter trained 6 steps on the toy task (its B matrices are no longer zero)."""
    raw = tiny_recipe(name="first", train={"max_steps": 6})
    return raw, api.train(load_recipe(raw)).adapter_dir


def fresh_with_init(raw: dict, adapter, **lora):
    """The model as the training loop builds it: base, the recipe's fresh adapter, then the saved weights."""
    from dstune.models.loading import load_model
    from dstune.train.init_adapter import load_initial_adapter
    from dstune.tuners.methods import add_method

    recipe = load_recipe({**raw, "train": {**raw["train"], "lora": {**raw["train"]["lora"], **lora}}})
    model = add_method(load_model(recipe.model.name_or_path, "float32"), recipe.train)
    return model, load_initial_adapter(model, adapter)


def test_continuing_starts_at_exactly_the_saved_adapter_s_logits(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    raw, adapter = trained
    model, parent = fresh_with_init(raw, adapter)
    saved = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(raw["model"]["name_or_path"]), adapter)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model.eval()(input_ids=ids).logits, saved.eval()(input_ids=ids).logits
    assert torch.equal(ours, theirs)
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    assert not torch.equal(ours, base)  # the saved adapter does something: the test could fail
    assert parent["run"] == "first" and parent["adapter"] == str(adapter.resolve())


def test_an_adapter_of_another_shape_or_scale_is_one_line(trained):
    raw, adapter = trained
    with pytest.raises(InputError, match=r"train.init_adapter: .* lora_alpha=8.*lora_alpha=16"):
        fresh_with_init(raw, adapter, alpha=16)
    with pytest.raises(InputError, match=r"train.init_adapter: .* r=4.*r=8"):
        fresh_with_init(raw, adapter, r=8)


def test_runs_from_adapters_form_a_chain_and_start_trained(trained, tmp_path):
    from cli_runner import run_cli

    raw, adapter = trained
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    second = run_cli([{"argv": ["train", str(path), "name=second", "--from-adapter", str(adapter)]}])[0]
    assert second.returncode == 0, second.stderr[-2000:]
    second_dir = tmp_path / "runs" / "second" / "adapter"
    third = run_cli([{"argv": ["train", str(path), "name=third", "--from-adapter", str(second_dir)]}])[0]
    assert third.returncode == 0, third.stderr[-2000:]
    manifest = json.loads((tmp_path / "runs" / "third" / "adapter" / "dstune_train.json").read_text())
    assert manifest["parent"]["run"] == "second" and manifest["parent"]["parent"]["run"] == "first"
    assert manifest["provenance"]["recipe"]["train"]["init_adapter"] == str(second_dir)
    first_loss = json.loads((adapter / "dstune_train.json").read_text())["log_history"][0]["loss"]
    second_loss = json.loads((second_dir / "dstune_train.json").read_text())["log_history"][0]["loss"]
    assert second_loss < first_loss  # the second run's first step is taken from the trained adapter
