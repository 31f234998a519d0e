"""dstune's bottleneck adapter: a registered peft method, identity at start, closed-form size, staged activation."""

import pytest
import torch
from peft import PeftConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from dstune import api
from dstune.config import load_recipe
from dstune.tuners.bottleneck import StagesOptions
from dstune.tuners.bottleneck import BottleneckConfig, bottleneck_layers, parameters_per_adapter
from dstune.tuners.staging import StageSwitch
from tiny import tiny_config


def base(model_type="llama", config=None):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config or tiny_config(model_type, vocab_size=1000))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "deepseek_v3"])
@pytest.mark.parametrize("placement", [["mlp"], ["self_attn", "mlp"]])
def test_fresh_adapter_leaves_the_base_logits_unchanged(model_type, placement):
    model = base(model_type)
    x = torch.randint(0, 1000, (2, 8))
    with torch.no_grad():
        expected = model(input_ids=x).logits
    peft_model = get_peft_model(model, BottleneckConfig(task_type=TaskType.CAUSAL_LM, r=8, target_modules=placement))
    assert len(bottleneck_layers(peft_model)) == 2 * len(placement)
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=x).logits, expected)
        # ...while a non-zero up-projection does change them, so the adapter is on the path.
        for _, layer in bottleneck_layers(peft_model):
            layer.bottleneck_up["default"].weight.fill_(0.01)
        assert not torch.allclose(peft_model(input_ids=x).logits, expected)


@pytest.mark.parametrize(("hidden", "r"), [(32, 4), (64, 16), (96, 8), (128, 1)])
def test_parameter_count_matches_the_closed_form(hidden, r):
    """Per adapter 2*d*r + r + d (docs/methods.md); Houlsby puts two per decoder layer."""
    config = LlamaConfig(vocab_size=100, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    peft_model = get_peft_model(base(config=config), BottleneckConfig(
        task_type=TaskType.CAUSAL_LM, r=r, target_modules=["self_attn", "mlp"]))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == 3 * 2 * (2 * hidden * r + r + hidden) == 6 * parameters_per_adapter(hidden, r)


def test_config_round_trips_through_peft(tmp_path):
    peft_model = get_peft_model(base(), BottleneckConfig(task_type=TaskType.CAUSAL_LM, r=4, activation="gelu"))
    peft_model.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is BottleneckConfig and loaded.r == 4 and loaded.activation == "gelu"


def adapter_grads(peft_model):
    grads = {}
    for name, layer in bottleneck_layers(peft_model):
        weight = layer.bottleneck_down["default"].weight
        grads[name] = None if weight.grad is None else float(weight.grad.abs().sum())
    return grads


def test_staged_activation_turns_on_top_layers_first_and_frozen_stages_get_no_gradient():
    config = tiny_config("llama", vocab_size=1000)
    config.num_hidden_layers = 4
    peft_model = get_peft_model(base(config=config), BottleneckConfig(task_type=TaskType.CAUSAL_LM, r=4))
    for _, layer in bottleneck_layers(peft_model):  # a non-zero up-projection lets gradient reach `down`
        torch.nn.init.normal_(layer.bottleneck_up["default"].weight, std=0.1)
    stages = StageSwitch(peft_model, StagesOptions(starts=[0, 10], unit="steps"))
    x = torch.randint(0, 1000, (2, 8))
    stages.update(step=0, epoch=0.0)
    peft_model(input_ids=x).logits.sum().backward()
    grads = adapter_grads(peft_model)
    on = {name for name, g in grads.items() if g}
    assert on == {f"base_model.model.model.layers.{i}.mlp" for i in (2, 3)}, grads
    assert all(grads[name] is None for name in grads if name not in on)
    peft_model.zero_grad(set_to_none=True)
    stages.update(step=10, epoch=0.0)
    peft_model(input_ids=x).logits.sum().backward()
    assert all(adapter_grads(peft_model).values())


def test_stages_in_training_leave_a_stage_that_never_starts_untouched(tiny_recipe):
    recipe = load_recipe(tiny_recipe(train={
        "method": "bottleneck", "max_steps": 6, "learning_rate": 1e-2,
        "bottleneck": {"r": 4, "stages": {"starts": [0, 1000], "order": "bottom_up"}},
    }))
    result = api.train(recipe)
    layers = dict(bottleneck_layers(result.model))
    lower = layers["base_model.model.model.layers.0.mlp"].bottleneck_up["default"].weight
    upper = layers["base_model.model.model.layers.1.mlp"].bottleneck_up["default"].weight
    assert torch.count_nonzero(lower) > 0  # bottom_up: layer 0 trained from step 0
    assert torch.count_nonzero(upper) == 0  # its stage starts at step 1000: still the zero init
    assert all(layer.stage_on for layer in layers.values())  # the saved model runs every adapter
