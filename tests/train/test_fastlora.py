"""The fused LoRA linear computes what peft computes: outputs and every gradient, with and without dropout."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from dstune.train.fastlora import disable_fused_lora, enable_fused_lora, fused_lora_class, keep_mask

from tiny import tiny_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_pair(dropout: float, use_dora: bool = False, model_type: str = "llama"):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config(model_type, vocab_size=300)).float()
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights=False,
                        use_dora=use_dora)
    reference = get_peft_model(base, config)
    fused = copy.deepcopy(reference)
    return reference.train(), fused, enable_fused_lora(fused)


def step(model, ids, seed):
    torch.manual_seed(seed)
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, atol):
    (logits_a, grads_a), (logits_b, grads_b) = a, b
    assert torch.allclose(logits_a, logits_b, atol=atol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=atol), name


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "deepseek_v3"])
def test_fused_equals_peft_without_dropout(model_type):
    reference, fused, count = peft_pair(0.0, model_type=model_type)
    assert count > 0
    ids = torch.randint(0, 300, (2, 12))
    assert_same(step(reference, ids, 0), step(fused.train(), ids, 0), 1e-5)


def test_fused_dropout_equals_peft_math_with_the_same_mask(monkeypatch):
    """peft's dropout module, fed the fused path's masks, reproduces the fused outputs and gradients."""
    reference, fused, _ = peft_pair(0.1)
    ids = torch.randint(0, 300, (2, 12))
    fused_result = step(fused.train(), ids, 7)

    torch.manual_seed(7)  # the same generator state: the same masks in the same order

    class SameMask(torch.nn.Module):
        def forward(self, x):
            return x * keep_mask(x.reshape(-1, x.shape[-1]).shape, 0.9, x.device).view(x.shape) / 0.9

    for module in reference.modules():
        if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
            module.lora_dropout["default"] = SameMask()
    reference.zero_grad()
    logits = reference(input_ids=ids).logits
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None}
    assert_same((logits.detach(), grads), fused_result, 1e-5)


def test_dropout_really_drops():
    _, fused, _ = peft_pair(0.3)
    ids = torch.randint(0, 300, (2, 12))
    first, second = step(fused.train(), ids, 1), step(fused, ids, 2)
    assert not torch.allclose(first[0], second[0])  # other masks, other outputs
    assert torch.equal(step(fused, ids, 1)[0], first[0])  # seeded: the same masks again


def test_keep_mask_rate():
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([400, 500]), 0.95, torch.device("cpu"))
    assert mask.dtype == torch.uint8 and mask.shape == (400, 500) and set(mask.unique().tolist()) == {0, 1}
    assert abs(mask.float().mean().item() - 0.95) < 0.003


def test_peft_forward_where_fusion_does_not_apply():
    """Eval without gradients, and DoRA, run peft's own forward: the results are peft's exactly."""
    reference, fused, _ = peft_pair(0.1)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(reference.eval()(input_ids=ids).logits, fused.eval()(input_ids=ids).logits)
    dora_reference, dora_fused, _ = peft_pair(0.0, use_dora=True)
    assert_same(step(dora_reference, ids, 0), step(dora_fused.train(), ids, 0), 1e-6)


def test_disable_restores_peft_layers_and_state_dict_is_unchanged():
    reference, fused, count = peft_pair(0.0)
    assert sum(type(m) is fused_lora_class() for m in fused.modules()) == count
    assert fused.state_dict().keys() == reference.state_dict().keys()
    assert disable_fused_lora(fused) == count
    assert not any(type(m) is fused_lora_class() for m in fused.modules())
