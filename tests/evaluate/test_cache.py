"""The generation cache: a re-run reuses answers; other weights or settings generate again."""

import torch

from dstune import api
from dstune.config import load_recipe


def test_rerun_reads_the_cache_and_changed_weights_miss_it(tiny_recipe, monkeypatch, tmp_path):
    monkeypatch.setenv("DSTUNE_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(tiny_recipe(eval={"cache": True, "bootstrap_samples": 0}))
    api.data(recipe)
    model, tokenizer = api.load(recipe)
    first = api._eval_on_test(recipe, model, tokenizer, "first")
    assert first["cached"] == 0 and first["generated_tokens"] > 0

    def no_generation(*args, **kwargs):
        raise AssertionError("generate ran although every answer is cached")

    monkeypatch.setattr(model, "generate", no_generation)
    again = api._eval_on_test(recipe, model, tokenizer, "again")
    assert again["cached"] == len(again["predictions"]) == 4
    assert again["predictions"] == first["predictions"] and again["metrics"] == first["metrics"]
    monkeypatch.undo()
    monkeypatch.setenv("DSTUNE_CACHE", str(tmp_path / "cache"))
    with torch.no_grad():  # one changed weight: a new fingerprint, so everything is generated again
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    changed = api._eval_on_test(recipe, model, tokenizer, "changed")
    assert changed["cached"] == 0
    longer = api._eval_on_test(load_recipe(tiny_recipe(eval={"cache": True, "bootstrap_samples": 0,
                                                             "max_new_tokens": 6})), model, tokenizer, "longer")
    assert longer["cached"] == 0
