import json

import torch

from dstune import api
from dstune.config import load_recipe
from dstune.tuners.methods import switch_adapter


def write_task(path, answer_of):
    path.write_text("".join(json.dumps({"instruction": f"item {i}", "output": answer_of(i)}) + "\n" for i in range(12)))
    return path


def test_two_trained_task_adapters_switch_by_name(tiny_recipe, tmp_path):
    tasks = {"colours": lambda i: ["red", "green", "blue"][i % 3], "numbers": lambda i: ["one", "two"][i % 2]}
    adapters, alone = {}, {}
    x = torch.randint(0, 1000, (2, 9))
    for name, answer_of in tasks.items():
        train_file = write_task(tmp_path / f"{name}.jsonl", answer_of)
        recipe = load_recipe(tiny_recipe(name=name, data={"train_file": str(train_file), "dev_file": None,
                                                          "test_file": None},
                                         train={"max_steps": 8, "learning_rate": 2e-2}))
        result = api.train(recipe)
        adapters[name] = result.adapter_dir
        result.model.eval()
        with torch.no_grad():
            alone[name] = result.model(input_ids=x).logits
    assert (alone["colours"] - alone["numbers"]).abs().max() > 1e-2
    model, _ = api.load(recipe, adapters=adapters)
    model.eval()
    for name in ("numbers", "colours", "numbers"):
        switch_adapter(model, name)
        with torch.no_grad():
            assert (model(input_ids=x).logits - alone[name]).abs().max() < 1e-5, name
