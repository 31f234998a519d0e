"""Every error the recipe alone shows comes before any stage runs: exit 2, one line, no dataset, no model loaded."""

import json

import pytest
import yaml

from dstune.cli.main import main


@pytest.fixture
def no_loading(monkeypatch):
    """Any model or tokenizer load fails the test: a recipe error must come before one."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the recipe error")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


def base(tmp_path, tiny_model_dirs, jsonl_dataset) -> dict:
    return {"name": "bad", "output_dir": str(tmp_path / "runs"),
            "model": {"name_or_path": str(tiny_model_dirs["llama"])},
            "data": {"source": "files", "train_file": str(jsonl_dataset["train"]),
                     "dev_file": str(jsonl_dataset["dev"]), "test_file": str(jsonl_dataset["test"])},
            "train": {"max_steps": 2}}


# (section, what the recipe sets, the start of the one-line message); "{tmp}" is the test's folder.
CASES = [
    ("model", {"model": {"name_or_path": "{tmp}/no-such-model"}}, "{tmp}/no-such-model: model not found"),
    ("model", {"model": {"template": "chatm"}}, "model.template: 'chatm' is not a chat template"),
    ("data", {"data": {"train_file": "{tmp}/nope.jsonl"}}, "{tmp}/nope.jsonl: data file not found"),
    ("data", {"data": {"train_file": None}}, "data.train_file: required when data.source is 'files'"),
    ("data", {"data": {"dev_file": None, "adversarial": {"reference": "dev"}}},
     "data.adversarial.reference: 'dev' is the dev split, and data.dev_file is not set"),
    ("data", {"data": {"augment": {"rules": {"doses": {}}}}}, "data.augment.rules: unknown rule 'doses'"),
    ("data", {"data": {"replay": {"ratio": 0.1, "file": "{tmp}/general.jsonl"}}},
     "{tmp}/general.jsonl: data file not found"),
    ("train", {"train": {"eval_steps": 4, "save_steps": 6}},
     "recipe: train.save_steps: 6 must be a multiple of train.eval_steps (4)"),
    ("train", {"train": {"learning_rate": -1e-3}}, "recipe: train.learning_rate: Input should be greater than 0"),
    ("train", {"train": {"init_adapter": "{tmp}/no-adapter"}},
     "train.init_adapter: {tmp}/no-adapter: adapter folder not found"),
    ("train.lora", {"train": {"lora": {"r": 0}}}, "recipe: train.lora.r: Input should be greater than or equal to 1"),
    ("train.lora (dora)", {"train": {"method": "dora", "lora": {"dropout": 1.5}}},
     "recipe: train.lora.dropout: Input should be less than 1"),
    ("train.ia3", {"train": {"method": "ia3", "ia3": {"targets": []}}}, "recipe: train.ia3.targets: "),
    ("train.prefix", {"train": {"method": "prefix", "prefix": {"num_virtual_tokens": 0}}},
     "recipe: train.prefix.num_virtual_tokens: Input should be greater than or equal to 1"),
    ("train.bottleneck", {"train": {"method": "bottleneck", "bottleneck": {"r": 0}}},
     "recipe: train.bottleneck.r: Input should be greater than or equal to 1"),
    ("eval", {"eval": {"checks": [{"kind": "regex"}]}}, "eval.checks: a regex check needs `pattern`"),
    ("eval", {"eval": {"general": {"enabled": True, "file": "{tmp}/gen.jsonl"}}}, "{tmp}/gen.jsonl: data file not found"),
    ("export", {"export": {"formats": ["onnx:int3"]}}, "export.formats: export format 'onnx' writes"),
]


def merged(recipe: dict, changes: dict) -> dict:
    for section, values in changes.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    return recipe


@pytest.mark.parametrize("command", ["run", "data", "train"])
def test_each_section_s_recipe_error_comes_before_any_stage(command, tmp_path, tiny_model_dirs, jsonl_dataset,
                                                              no_loading, capsys):
    for section, changes, message in CASES:
        if command == "data" and section.startswith(("train", "eval", "export")):
            continue  # `dstune data` runs no training: its own sections only
        tmp = tmp_path / section.split(" ")[0]
        tmp.mkdir(exist_ok=True)
        raw = json.loads(json.dumps(changes).replace("{tmp}", str(tmp)))
        recipe = merged(base(tmp, tiny_model_dirs, jsonl_dataset), raw)
        path = tmp / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        code = main([command, str(path)])
        err = capsys.readouterr().err
        expected = "dstune: error: " + message.replace("{tmp}", str(tmp)).replace("recipe: ", f"{path}: ")
        assert code == 2, (section, err)
        assert len(err.splitlines()) == 1 and err.startswith(expected), (section, err)
        assert not (tmp / "runs" / "bad" / "data").exists(), section


def test_a_minimal_recipe_trains_with_the_method_s_default_learning_rate(tiny_recipe):
    from dstune import api
    from dstune.config import load_recipe

    raw = tiny_recipe()
    del raw["train"]["learning_rate"]
    result = api.train(load_recipe({**raw, "train": {**raw["train"], "max_steps": 1}}))
    assert result.summary["learning_rate"] == 2e-4
    assert result.summary["learning_rate_from"] == "the lora method's default"
    prefix = load_recipe({**raw, "train": {"method": "prefix"}})
    assert prefix.train.learning_rate_source() == (1e-2, "the prefix method's default")
