import torch
from transformers import TrainerCallback

from dstune import api
from dstune.config import load_recipe


class GradCapture(TrainerCallback):
    """Keeps the LoRA gradients just before the first optimizer step."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def first_step_grads(tiny_recipe, monkeypatch, batch_size, grad_accum):
    from dstune.train import trainer as trainer_module

    capture = GradCapture()
    original = trainer_module.DstuneTrainer.__init__

    def with_capture(self, *args, callbacks=None, **kwargs):
        original(self, *args, callbacks=[*(callbacks or []), capture], **kwargs)

    monkeypatch.setattr(trainer_module.DstuneTrainer, "__init__", with_capture)
    recipe = load_recipe(tiny_recipe(
        name=f"ga{batch_size}x{grad_accum}",
        data={"dev_file": None, "test_file": None},
        train={"max_steps": 1, "batch_size": batch_size, "grad_accum": grad_accum, "max_grad_norm": 1e9},
    ))
    result = api.train(recipe)
    losses = [e["loss"] for e in result.summary["log_history"] if "loss" in e]
    return capture.grads, losses[0]


def test_batch_8_equals_batch_1_times_accumulation_8(tiny_recipe, monkeypatch, jsonl_dataset):
    lines = jsonl_dataset["train"].read_text().splitlines()[:8]
    jsonl_dataset["train"].write_text("\n".join(lines) + "\n")  # exactly one batch of 8 samples, varied lengths
    big, big_loss = first_step_grads(tiny_recipe, monkeypatch, 8, 1)
    small, small_loss = first_step_grads(tiny_recipe, monkeypatch, 1, 8)
    assert big.keys() == small.keys() and big
    for name in big:
        assert torch.allclose(big[name], small[name], atol=1e-5, rtol=1e-4), name
    assert abs(big_loss - small_loss) < 1e-5 * max(1.0, abs(big_loss))
