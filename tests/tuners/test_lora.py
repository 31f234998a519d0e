import pytest
import torch
from transformers import AutoModelForCausalLM

from dstune.tuners.lora import LoraOptions
from dstune.errors import InputError
from dstune.tuners.lora import add_lora
from dstune.tuners.methods import load_adapters, switch_adapter

from tiny import tiny_config


def base(model_type, seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, vocab_size=300))


def adapted_modules(peft_model):
    return {name.split(".lora_")[0].split("base_model.model.")[-1]
            for name, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_dense_preset_targets_attention_and_mlp(model_type):
    modules = adapted_modules(add_lora(base(model_type), LoraOptions(r=4)))
    leaves = {m.rsplit(".", 1)[-1] for m in modules}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(modules) == 7 * 2


def test_deepseek_v3_preset_targets_mla_dense_and_shared_experts():
    modules = adapted_modules(add_lora(base("deepseek_v3"), LoraOptions(r=4)))
    expected = {f"model.layers.{i}.self_attn.{n}" for i in (0, 1)
                for n in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")}
    expected |= {f"model.layers.0.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}
    expected |= {f"model.layers.1.mlp.shared_experts.{n}" for n in ("gate_proj", "up_proj", "down_proj")}
    assert modules == expected  # routed experts stay frozen unless asked for


def test_deepseek_v3_routed_experts_through_target_parameters():
    with pytest.raises(InputError, match="train.lora.dropout: must be 0"):
        add_lora(base("deepseek_v3"), LoraOptions(r=4, routed_experts=True, dropout=0.1))
    model = add_lora(base("deepseek_v3"), LoraOptions(r=4, routed_experts=True, dropout=0.0))
    modules = adapted_modules(model)
    assert any("mlp.experts" in m for m in modules)
    assert "model.layers.1.mlp.shared_experts.gate_proj" in modules
    x = torch.randint(0, 300, (2, 6))
    model(input_ids=x, labels=x).loss.backward()
    expert_grads = [p.grad for n, p in model.named_parameters() if "experts" in n and "lora_A" in n]
    assert expert_grads and all(g is not None for g in expert_grads)


def test_routed_experts_on_dense_model_is_an_input_error():
    with pytest.raises(InputError, match="routed_experts"):
        add_lora(base("llama"), LoraOptions(r=4, routed_experts=True, dropout=0.0))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "deepseek_v3"])
def test_fresh_lora_is_identity_and_scaled(model_type):
    reference = base(model_type)
    x = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        expected = reference(input_ids=x).logits
    model = add_lora(base(model_type), LoraOptions(r=4, alpha=16))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            assert torch.count_nonzero(param) == 0, name  # B = 0 at init
    layer = next(m for n, m in model.named_modules() if n.endswith("o_proj") and hasattr(m, "scaling"))
    assert layer.scaling["default"] == pytest.approx(16 / 4)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, expected, atol=1e-6)


def test_save_load_and_switch_two_adapters(tmp_path):
    x = torch.randint(0, 300, (2, 7))
    outputs = {}
    for seed, name in [(1, "finance"), (2, "medicine")]:
        model = add_lora(base("qwen2"), LoraOptions(r=4))
        torch.manual_seed(seed)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.5)
        model.eval()
        with torch.no_grad():
            outputs[name] = model(input_ids=x).logits
        model.save_pretrained(tmp_path / name)
    both = load_adapters(base("qwen2"), {n: tmp_path / n for n in ("finance", "medicine")})
    assert not torch.allclose(outputs["finance"], outputs["medicine"], atol=1e-3)
    for name in ("finance", "medicine", "finance"):
        switch_adapter(both, name)
        with torch.no_grad():
            assert torch.allclose(both(input_ids=x).logits, outputs[name], atol=1e-5), name
    with pytest.raises(InputError, match="not loaded"):
        switch_adapter(both, "law")


def test_pickle_adapter_is_refused(tmp_path):
    model = add_lora(base("llama"), LoraOptions(r=4))
    model.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(InputError, match="adapter_model.bin: pickle weight file refused"):
        load_adapters(base("llama"), {"a": tmp_path / "a"})
