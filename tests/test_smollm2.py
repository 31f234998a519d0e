"""The real embedded model: GGUF -> cached safetensors, then 2 LoRA steps of the demo recipe."""

import pytest
import torch

from dstune import api
from dstune.config import load_recipe


@pytest.mark.slow
def test_two_real_steps_on_smollm2(tmp_path):
    recipe = load_recipe("recipes/icd10_lora.yaml", [
        f"output_dir={tmp_path}", "train.max_steps=2", "train.eval_steps=0", "train.batch_size=4",
        "data.icd10.chapters=[10]", "eval.max_samples=4",
    ])
    result = api.train(recipe)
    assert result.summary["optimizer_steps"] == 2
    assert result.summary["total_parameters"] > 130_000_000
    assert result.model.base_model.model.config.model_type == "llama"
    losses = [e["loss"] for e in result.summary["log_history"] if "loss" in e]
    assert all(torch.isfinite(torch.tensor(losses)))
    scores = api.evaluate(recipe, adapter=result.adapter_dir)
    assert scores["samples"] == 4 and 0 <= scores["metrics"]["exact_match"] <= 1
