"""QLoRA (4-bit NF4 base through bitsandbytes) and the rsLoRA / DoRA options of LoRA."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from dstune import api
from dstune.config import load_recipe
from dstune.tuners.lora import LoraOptions
from dstune.errors import InputError
from dstune.models import loading
from dstune.tuners.lora import add_lora
from tiny import tiny_config

BNB_PROBLEM = loading.bitsandbytes_problem()


@pytest.mark.skipif(BNB_PROBLEM is not None, reason=f"QLoRA needs bitsandbytes: {BNB_PROBLEM}")
def test_qlora_trains_lora_on_a_4bit_base(tiny_recipe):
    import bitsandbytes as bnb

    recipe = load_recipe(tiny_recipe(model={"load_in_4bit": True}, train={"max_steps": 16, "learning_rate": 2e-2}))
    result = api.train(recipe)
    quantized = [m for m in result.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # every linear of both decoder layers; the LM head stays full precision
    losses = [e["loss"] for e in result.summary["log_history"] if "loss" in e]
    assert sum(losses[-4:]) / 4 < 0.7 * losses[0], losses
    merged = api.merge(recipe)  # folds into the full-precision base, not into NF4 weights
    assert (merged / "model.safetensors").is_file()


def test_qlora_without_bitsandbytes_is_one_line(tiny_recipe, monkeypatch):
    monkeypatch.setattr(loading, "bitsandbytes_problem", lambda: "bitsandbytes is not installed")
    recipe = load_recipe(tiny_recipe(model={"load_in_4bit": True}))
    with pytest.raises(InputError, match="model.load_in_4bit: bitsandbytes is not installed"):
        api.train(recipe)


def test_rslora_scales_by_alpha_over_sqrt_r():
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_config(tiny_config("llama", 1000)),
                     LoraOptions(r=16, alpha=8, use_rslora=True))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(16))


def test_dora_refuses_fused_experts_with_one_line():
    torch.manual_seed(0)
    with pytest.raises(InputError, match="DoRA cannot adapt fused routed experts"):
        add_lora(AutoModelForCausalLM.from_config(tiny_config("deepseek_v3", 1000)),
                 LoraOptions(r=4, routed_experts=True), use_dora=True)
