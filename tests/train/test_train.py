import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dstune import api
from dstune.config import load_recipe


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "deepseek_v3"])
def test_training_lowers_loss_and_saves_peft_adapter(tiny_recipe, model_type):
    recipe = load_recipe(tiny_recipe(model_type, train={"max_steps": 30, "learning_rate": 2e-2}))
    result = api.train(recipe)
    losses = [e["loss"] for e in result.summary["log_history"] if "loss" in e]
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    adapter = result.adapter_dir
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved and any(torch.count_nonzero(t) for k, t in saved.items() if "lora_B" in k)
    summary = result.summary
    assert 0 < summary["trainable_percent"] < 100
    assert summary["tokens"] > summary["supervised_tokens"] > 0
    assert summary["optimizer_steps"] == 30


def test_cosine_schedule_warmup_and_clipping(tiny_recipe):
    recipe = load_recipe(tiny_recipe(train={"max_steps": 10, "warmup_ratio": 0.2, "max_grad_norm": 1.0,
                                            "learning_rate": 1e-2}))
    result = api.train(recipe)
    lrs = [e["learning_rate"] for e in result.summary["log_history"] if "learning_rate" in e]
    # The logged LR is the one each step used: 2 warmup steps, the peak, then a cosine down towards 0.
    assert lrs[:3] == pytest.approx([0.0, 5e-3, 1e-2])
    assert lrs[3:] == pytest.approx([5e-3 * (1 + math.cos(math.pi * k / 8)) for k in range(1, 8)])
    # The pre-clip gradient norm of every step is logged (clipping itself: tests/train/test_golden.py).
    assert all(e["grad_norm"] > 0 for e in result.summary["log_history"] if "loss" in e)


def test_early_stopping_restores_best_checkpoint(tiny_recipe, monkeypatch):
    """Dev exact match rises, then falls: training stops after `patience` bad evals and keeps the best weights."""
    from dstune.train import loop as trainer_module

    scores = iter([0.1, 0.5, 0.2, 0.2, 0.2, 0.2])
    snapshots = {}

    def fake_eval(model, *args, **kwargs):
        score = next(scores)
        snapshots[score] = lora_state(model)
        return {"metrics": {"exact_match": score}}

    monkeypatch.setattr(trainer_module, "evaluate_records", fake_eval)
    recipe = load_recipe(tiny_recipe(train={"max_steps": 40, "eval_steps": 2, "early_stopping_patience": 2}))
    result = api.train(recipe)
    assert result.summary["optimizer_steps"] == 8  # evals at 2, 4 (best), 6, 8 -> stop after 2 without gain
    assert result.summary["best_metric"] == {"exact_match": 0.5}
    final = lora_state(result.model)
    for name, tensor in snapshots[0.5].items():
        assert torch.equal(final[name], tensor), name
    assert not all(torch.equal(final[n], t) for n, t in snapshots[0.1].items())


def test_the_best_dev_step_is_kept_when_it_is_not_a_save_step(tiny_recipe, monkeypatch):
    """save_steps 4 with eval_steps 1: the best step (1) was no save step; its weights are still the ones kept."""
    from dstune.train import loop as trainer_module

    scores = iter([0.5, 0.1, 0.1, 0.1])
    snapshots = []

    def fake_eval(model, *args, **kwargs):
        snapshots.append(lora_state(model))
        return {"metrics": {"exact_match": next(scores)}}

    monkeypatch.setattr(trainer_module, "evaluate_records", fake_eval)
    recipe = load_recipe(tiny_recipe(train={"max_steps": 4, "eval_steps": 1, "save_steps": 4,
                                            "early_stopping_patience": 0}))
    result = api.train(recipe)
    assert result.summary["best_metric"] == {"exact_match": 0.5}
    final = lora_state(result.model)
    assert all(torch.equal(final[name], tensor) for name, tensor in snapshots[0].items())


def test_same_seed_same_adapter(tiny_recipe):
    runs = [api.train(load_recipe(tiny_recipe(name=f"seeded{i}", train={"max_steps": 3}))) for i in range(2)]
    first, second = (lora_state(r.model) for r in runs)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_fast_path_trains_the_same_weights_as_the_plain_path(tiny_recipe):
    """Packing, the fused LoRA layers and the chunked head change the work, not the result (dropout off)."""
    states = {}
    for fast in (False, True):
        recipe = load_recipe(tiny_recipe(name=f"fast{fast}", train={
            "max_steps": 3, "packing": fast, "fused_lora": fast, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}))
        result = api.train(recipe)
        states[fast] = lora_state(result.model)
        summary = result.summary
        assert summary["packing"] is fast and (summary["fused_lora_layers"] > 0) is fast
        assert 0 <= summary["padding_fraction"] < 1
    assert states[True].keys() == states[False].keys()
    for name, value in states[True].items():
        assert torch.allclose(value, states[False][name], atol=1e-5), name


def test_gradient_checkpointing_gives_the_same_weights(tiny_recipe):
    """Recomputation replays the same dropout masks (checkpointing restores the RNG state), so nothing changes."""
    states = {}
    for checkpointing in (False, True):
        recipe = load_recipe(tiny_recipe(name=f"gc{checkpointing}", train={
            "max_steps": 3, "gradient_checkpointing": checkpointing, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}))
        result = api.train(recipe)
        assert result.summary["gradient_checkpointing"] is checkpointing
        assert result.model.get_base_model().is_gradient_checkpointing is checkpointing
        states[checkpointing] = lora_state(result.model)
    for name, value in states[True].items():
        assert torch.allclose(value, states[False][name], atol=1e-5), name


def test_packing_with_prefix_tuning_is_a_config_error(tiny_recipe):
    from dstune.errors import InputError

    with pytest.raises(InputError, match="train.packing"):
        load_recipe(tiny_recipe(train={"method": "prefix", "packing": True}))
    assert not load_recipe(tiny_recipe(train={"method": "prefix"})).train.packs
