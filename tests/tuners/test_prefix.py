"""Prefix-Tuning: generation continues from the prefix exactly as the training forward sees it; multi-task
shared prefixes get gradients from the right tasks; the activation init reproduces the base model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from dstune.tuners.prefix import PrefixOptions
from dstune.errors import InputError
from dstune.tuners.methods import load_adapters
from dstune.tuners.prefix import SHARED, add_prefix
from tiny import tiny_config


def base(model_type="llama", seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, vocab_size=1000))


def randomise(model, scale=1.0):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, scale)
    return model


def padded_batch():
    torch.manual_seed(3)
    input_ids = torch.randint(5, 1000, (3, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    attention_mask[2, :1] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("projection", [False, True])
def test_generation_continues_from_the_prefix_like_the_forward(model_type, projection):
    """peft 0.21 + transformers 5.x drops the prefix in generate (cache renamed); dstune's path must not."""
    model = randomise(add_prefix(base(model_type), PrefixOptions(
        num_virtual_tokens=4, projection=projection, projection_hidden=16)))
    model.eval()
    input_ids, mask = padded_batch()
    new = 5
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
        full_mask = torch.cat([mask, torch.ones(3, new, dtype=mask.dtype)], dim=1)
        # One forward over prompt + answer, no cache: every generated step must match it.
        logits = model(input_ids=out.sequences[:, :-1], attention_mask=full_mask[:, :-1]).logits[:, 6:]
        for step, scores in enumerate(out.scores):
            assert (scores - logits[:, step]).abs().max() < 1e-4, step
        with model.disable_adapter():
            plain = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)
    assert not torch.equal(plain, out.sequences), "the prefix did not change generation"


def test_activation_init_reproduces_the_base_model_reading_that_text():
    """A prefix set to the base model's keys/values of text T makes the model behave as if T came first."""
    plain = base("qwen2")
    model = add_prefix(base("qwen2"), PrefixOptions(num_virtual_tokens=6, init="activations"))
    text = torch.randint(5, 1000, (6,))
    model.init_from_activations(text)
    query = torch.randint(5, 1000, (1, 5))
    with torch.no_grad():
        expected = plain(input_ids=torch.cat([text[None], query], dim=1)).logits[:, 6:]
        got = model(input_ids=query).logits
    assert (got - expected).abs().max() < 1e-4


def multitask_model():
    options = PrefixOptions(num_virtual_tokens=3, shared_tokens=4, tasks=["coding", "triage"])
    return randomise(add_prefix(base("llama"), options), 0.5)


def prefix_grads(model):
    return {name: model.prompt_encoder[name].embedding.weight.grad for name in (SHARED, "coding", "triage")}


def test_shared_prefix_learns_from_all_tasks_and_task_prefixes_from_their_own():
    model = multitask_model()
    assert model.prefix_length("coding") == 7
    input_ids, mask = padded_batch()
    model(input_ids=input_ids, attention_mask=mask, task="coding").logits.sum().backward()
    grads = prefix_grads(model)
    assert grads[SHARED].abs().sum() > 0 and grads["coding"].abs().sum() > 0
    assert grads["triage"] is None or grads["triage"].abs().sum() == 0
    model.zero_grad()
    model(input_ids=input_ids, attention_mask=mask, task=["triage", "coding", "triage"]).logits.sum().backward()
    grads = prefix_grads(model)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_multitask_prefix_saves_loads_and_generates_per_task(tmp_path):
    model = multitask_model()
    model.eval()
    input_ids, mask = padded_batch()
    with torch.no_grad():
        expected = {t: model(input_ids=input_ids, attention_mask=mask, task=t).logits for t in ("coding", "triage")}
    assert (expected["coding"] - expected["triage"]).abs().max() > 1e-2
    model.save_pretrained(tmp_path / "prefix")
    loaded = load_adapters(base("llama"), {"default": tmp_path / "prefix"})
    loaded.eval()
    for task in ("triage", "coding"):
        with torch.no_grad():
            assert (loaded(input_ids=input_ids, attention_mask=mask, task=task).logits - expected[task]).abs().max() < 1e-5
            with loaded.for_task(task):
                out = loaded.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                                      output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        assert (out.scores[0] - expected[task][:, -1]).abs().max() < 1e-4
    with pytest.raises(InputError, match="task 'billing' has no prefix"):
        loaded(input_ids=input_ids, attention_mask=mask, task="billing")


def test_prefix_refuses_mla_models_with_one_line():
    with pytest.raises(InputError, match="prefix tuning does not support deepseek_v3"):
        add_prefix(base("deepseek_v3"), PrefixOptions())


def test_multitask_prefix_recipe_trains_and_evaluates_each_task(tiny_recipe, tmp_path):
    import json

    from dstune import api
    from dstune.config import load_recipe

    answers = {"colours": lambda i: ["red", "green", "blue"][i % 3], "numbers": lambda i: ["one", "two"][i % 2]}
    files = {}
    for split, rows in (("train", range(16)), ("dev", range(16, 20)), ("test", range(20, 24))):
        files[split] = tmp_path / f"mt-{split}.jsonl"
        files[split].write_text("".join(
            json.dumps({"instruction": f"{task} item {i}", "output": answers[task](i), "task": task}) + "\n"
            for i in rows for task in answers))
    recipe = load_recipe(tiny_recipe(
        data={"train_file": str(files["train"]), "dev_file": str(files["dev"]), "test_file": str(files["test"])},
        train={"method": "prefix", "max_steps": 12, "learning_rate": 1e-1, "eval_steps": 6,
               "prefix": {"num_virtual_tokens": 4, "shared_tokens": 4, "tasks": ["colours", "numbers"]}},
    ))
    result = api.train(recipe)
    losses = [e["loss"] for e in result.summary["log_history"] if "loss" in e]
    assert sum(losses[-4:]) / 4 < 0.9 * losses[0], losses
    assert any("eval_exact_match" in e for e in result.summary["log_history"])  # dev generation ran per task
    assert json.loads((result.adapter_dir / "dstune_prefix.json").read_text())["tasks"] == ["colours", "numbers"]
    scores = api.evaluate(recipe, adapter=result.adapter_dir)
    assert scores["samples"] == 8


def test_multitask_prefix_early_stopping_restores_every_prefix_of_the_best_checkpoint(tiny_recipe, tmp_path,
                                                                                       monkeypatch):
    import json

    from dstune import api
    from dstune.config import load_recipe
    from dstune.train import loop as trainer_module

    scores, snapshots = iter([0.1, 0.5, 0.2, 0.2]), {}

    def fake_eval(model, *args, **kwargs):
        score = next(scores)
        snapshots[score] = {n: model._adapter_key_values(n).detach().clone() for n in (SHARED, "a", "b")}
        return {"metrics": {"exact_match": score}}

    monkeypatch.setattr(trainer_module, "evaluate_records", fake_eval)
    rows = [{"instruction": f"q{i}", "output": "yes", "task": "ab"[i % 2]} for i in range(8)]
    data = tmp_path / "ab.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(tiny_recipe(
        data={"train_file": str(data), "dev_file": str(data), "test_file": None, "quality": {"leakage": "none"}},
        train={"method": "prefix", "max_steps": 40, "learning_rate": 1e-1, "eval_steps": 2,
               "early_stopping_patience": 2,
               "prefix": {"num_virtual_tokens": 2, "shared_tokens": 2, "tasks": ["a", "b"]}},
    ))
    result = api.train(recipe)
    assert result.summary["optimizer_steps"] == 8 and result.summary["best_metric"] == {"exact_match": 0.5}
    for name in (SHARED, "a", "b"):
        final = result.model._adapter_key_values(name)
        assert torch.allclose(final, snapshots[0.5][name]), name
        assert not torch.allclose(final, snapshots[0.2][name]), name
