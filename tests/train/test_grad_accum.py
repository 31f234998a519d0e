import torch

from dstune import api
from dstune.config import load_recipe


def first_step_grads(tiny_recipe, monkeypatch, batch_size, grad_accum):
    """The trainable parameters' gradients as the first optimizer step sees them (after accumulation)."""
    from dstune.train import loop

    grads = {}
    build = loop.build_optimizer

    def capturing(model, objective, cfg):
        optimizer = build(model, objective, cfg)
        names = {p: n for n, p in model.named_parameters()}
        step = optimizer.step

        def step_and_capture(*args, **kwargs):
            if not grads:
                grads.update({names[p]: p.grad.detach().clone() for group in optimizer.param_groups
                              for p in group["params"] if p.grad is not None})
            return step(*args, **kwargs)

        optimizer.step = step_and_capture
        return optimizer

    monkeypatch.setattr(loop, "build_optimizer", capturing)
    recipe = load_recipe(tiny_recipe(
        name=f"ga{batch_size}x{grad_accum}",
        data={"dev_file": None, "test_file": None},
        train={"max_steps": 1, "batch_size": batch_size, "grad_accum": grad_accum, "max_grad_norm": 1e9},
    ))
    result = api.train(recipe)
    losses = [e["loss"] for e in result.summary["log_history"] if "loss" in e]
    return grads, losses[0]


def test_batch_8_equals_batch_1_times_accumulation_8(tiny_recipe, monkeypatch, jsonl_dataset):
    lines = jsonl_dataset["train"].read_text().splitlines()[:8]
    jsonl_dataset["train"].write_text("\n".join(lines) + "\n")  # exactly one batch of 8 samples, varied lengths
    big, big_loss = first_step_grads(tiny_recipe, monkeypatch, 8, 1)
    small, small_loss = first_step_grads(tiny_recipe, monkeypatch, 1, 8)
    assert big.keys() == small.keys() and big
    for name in big:
        assert torch.allclose(big[name], small[name], atol=1e-5, rtol=1e-4), name
    assert abs(big_loss - small_loss) < 1e-5 * max(1.0, abs(big_loss))
