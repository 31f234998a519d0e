"""The real embedded model: GGUF -> cached safetensors, then 2 LoRA steps of the demo recipe."""

import pytest
import torch

from dstune import api
from dstune.config import load_recipe


@pytest.mark.slow
def test_two_real_steps_on_smollm2(tmp_path):
    recipe = load_recipe("recipes/icd10_lora.yaml", [
        f"output_dir={tmp_path}", "train.max_steps=2", "train.eval_steps=0", "train.batch_size=4",
        "data.icd10.chapters=[10]", "eval.max_samples=4", "eval.general.enabled=false", "eval.cache=false",
    ])
    result = api.train(recipe)
    assert result.summary["optimizer_steps"] == 2
    assert result.summary["total_parameters"] > 130_000_000
    assert result.model.base_model.model.config.model_type == "llama"
    losses = [e["loss"] for e in result.summary["log_history"] if "loss" in e]
    assert all(torch.isfinite(torch.tensor(losses)))
    scores = api.evaluate(recipe, adapter=result.adapter_dir)
    assert scores["samples"] == 4 and 0 <= scores["metrics"]["exact_match"] <= 1


@pytest.mark.slow
def test_gguf_conversion_is_cached_and_exact(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from dstune.models.loading import embedded_gguf_path, load_model, resolve_model_path

    monkeypatch.setenv("DSTUNE_CACHE", str(tmp_path))
    out = resolve_model_path("smollm2-135m-instruct")
    assert out.is_relative_to(tmp_path)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert "quantization_config" not in (out / "config.json").read_text()
    gguf = embedded_gguf_path("smollm2-135m-instruct")
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    x = torch.randint(0, 49152, (1, 12))
    with torch.no_grad():
        assert torch.equal(load_model(out)(input_ids=x).logits, direct(input_ids=x).logits)
    # A second call finds the cached directory and converts nothing.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("smollm2-135m-instruct") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
