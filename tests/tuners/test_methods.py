"""Every PEFT method: training lowers the loss, save -> load gives the same logits, adapters switch by name."""

import json

import pytest
import torch

from dstune import api
from dstune.config import load_recipe
from dstune.tuners.methods import is_mergeable, switch_adapter

# (method, architecture, learning rate, method options)
CASES = [
    ("lora", "deepseek_v3", 2e-2, {}),
    ("dora", "llama", 2e-2, {}),
    ("dora", "qwen2", 2e-2, {}),
    ("ia3", "llama", 1e-1, {}),
    ("ia3", "deepseek_v3", 1e-1, {}),
    ("prefix", "llama", 1e-1, {"prefix": {"num_virtual_tokens": 8}}),
    ("prefix", "qwen2", 1e-1, {"prefix": {"num_virtual_tokens": 8, "projection": True, "projection_hidden": 32}}),
    ("bottleneck", "llama", 2e-2, {"bottleneck": {"r": 8, "placement": "houlsby"}}),
    ("bottleneck", "qwen2", 2e-2, {"bottleneck": {"r": 8, "placement": "pfeiffer", "activation": "gelu"}}),
    ("bottleneck", "deepseek_v3", 2e-2, {"bottleneck": {"r": 8, "placement": "houlsby", "activation": "silu"}}),
]
PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "ia3": "IA3", "prefix": "PREFIX_TUNING", "bottleneck": "BOTTLENECK"}
TASKS = {"colours": lambda i: ["red", "green", "blue"][i % 3], "numbers": lambda i: ["one", "two"][i % 2]}


def task_file(path, answer_of):
    path.write_text("".join(json.dumps({"instruction": f"item {i}", "output": answer_of(i)}) + "\n" for i in range(12)))
    return path


def batch():
    torch.manual_seed(1)
    input_ids = torch.randint(0, 1000, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # a left-padded row
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.mark.parametrize(("method", "model_type", "lr", "options"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_method_trains_saves_loads_and_switches(tiny_recipe, tmp_path, method, model_type, lr, options):
    adapters, alone = {}, {}
    for name, answer_of in TASKS.items():
        train_file = task_file(tmp_path / f"{name}.jsonl", answer_of)
        recipe = load_recipe(tiny_recipe(
            model_type, name=name, data={"train_file": str(train_file), "dev_file": None, "test_file": None},
            train={"method": method, "max_steps": 16, "learning_rate": lr, **options},
        ))
        result = api.train(recipe)
        losses = [e["loss"] for e in result.summary["log_history"] if "loss" in e]
        # A prefix steers a random tiny model less than weight updates do; a prefix that were not in the
        # forward would leave the loss flat.
        limit = 0.9 if method == "prefix" else 0.7
        assert sum(losses[-4:]) / 4 < limit * losses[0], (name, losses)
        config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
        assert config["peft_type"] == PEFT_TYPES[method]
        assert config.get("use_dora", False) == (method == "dora")
        assert (result.adapter_dir / "adapter_model.safetensors").is_file()
        adapters[name] = result.adapter_dir
        result.model.eval()
        with torch.no_grad():
            alone[name] = result.model(**batch()).logits
    assert (alone["colours"] - alone["numbers"]).abs().max() > 1e-2

    model, _ = api.load(recipe, adapters=adapters)
    model.eval()
    assert is_mergeable(model) == (method in {"lora", "dora", "ia3"})
    for name in ("numbers", "colours", "numbers"):
        switch_adapter(model, name)
        with torch.no_grad():
            assert (model(**batch()).logits - alone[name]).abs().max() < 1e-4, name


def test_unmergeable_methods_refuse_merge_with_one_line(tiny_recipe):
    # `adapter` is the bottleneck method's old name: recipes that use it still load, as `bottleneck`.
    recipe = load_recipe(tiny_recipe(train={"method": "adapter", "max_steps": 1, "adapter": {"r": 4}}))
    assert recipe.train.method == "bottleneck" and recipe.train.bottleneck.r == 4
    api.train(recipe)
    from dstune.errors import InputError

    with pytest.raises(InputError, match="bottleneck adapters cannot be merged"):
        api.merge(recipe)


def test_run_skips_merge_for_prefix(tiny_recipe):
    recipe = load_recipe(tiny_recipe(train={"method": "prefix", "max_steps": 2, "prefix": {"num_virtual_tokens": 2}}))
    report = api.run(recipe)
    assert report["artifacts"]["merged"] is None
    assert report["training"]["method"] == "prefix"
    assert report["metrics"]["exact_match"]["tuned"] is not None
