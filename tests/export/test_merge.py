import pytest
import torch

from dstune import api
from dstune.config import load_recipe
from dstune.models.loading import load_model


@pytest.mark.parametrize("model_type", ["llama", "deepseek_v3"])
def test_merged_logits_equal_adapter_logits(tiny_recipe, model_type):
    recipe = load_recipe(tiny_recipe(model_type, train={"max_steps": 6}))
    result = api.train(recipe)
    x = torch.randint(0, 1000, (3, 11))
    adapter_model, _ = api.load(recipe, adapters={"default": result.adapter_dir})
    base_model, _ = api.load(recipe)
    merged_dir = api.merge(recipe)
    merged = load_model(merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        tuned = adapter_model(input_ids=x).logits
        assert (tuned - base_model(input_ids=x).logits).abs().max() > 1e-3  # training changed the model
        assert (merged(input_ids=x).logits - tuned).abs().max() < 1e-4
