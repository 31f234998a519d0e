"""Structured pruning: the pruned directory, reloaded by plain transformers, equals the masked original; GQA
groups stay whole and equal; bad ratios fail in one line; the pruned model exports."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dstune.compress.prune import apply_plan, make_plan, mask_plan, parameters, score
from dstune.errors import InputError
from tiny import make_tiny_model_dir


@pytest.fixture(scope="module")
def smollm2_shaped(tmp_path_factory, tokenizer_dir):
    """SmolLM2's shape in small: 9 query heads over 3 KV heads, tied embeddings, 4 layers (head_dim 16: onnxruntime's
    GroupQueryAttention takes multiples of 16)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("smol") / "smol", "llama", tokenizer_dir, hidden_size=144,
                               num_attention_heads=9, num_key_value_heads=3, head_dim=16, num_hidden_layers=4,
                               intermediate_size=192, tie_word_embeddings=True)


def samples(n=6, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(300, 20000, (1, length), generator=g) for _ in range(n)]


CASES = {  # model -> prune settings
    "llama": dict(heads=0.5, mlp=0.25, layers=0.5),
    "qwen2": dict(heads=0.5, mlp=0.25, layers=0.5, head_mode="groups"),
    "smollm2": dict(heads=0.34, mlp=0.25, layers=0.25),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pruned_directory_equals_the_masked_original(name, tiny_model_dirs, smollm2_shaped, tmp_path):
    path = smollm2_shaped if name == "smollm2" else tiny_model_dirs[name]
    original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    heads, kv = original.config.num_attention_heads, original.config.num_key_value_heads
    plan = make_plan(original.config, score(original, samples()), **CASES[name])
    pruned = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    before = parameters(pruned)
    apply_plan(pruned, plan)
    pruned.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    handles = mask_plan(original, plan)
    ids = samples(2, 24, seed=1)
    with torch.no_grad():
        for x in ids:
            masked, got = original(x).logits, reloaded(x).logits
            assert torch.allclose(got, masked, atol=1e-5), float((got - masked).abs().max())
            assert not torch.allclose(got, AutoModelForCausalLM.from_pretrained(path)(x).logits, atol=1e-3)
    for handle in handles:
        handle.remove()
    config = AutoConfig.from_pretrained(tmp_path / "pruned")
    assert config.num_hidden_layers == len(plan.layers) < original.config.num_hidden_layers
    assert config.intermediate_size == round(0.75 * original.config.intermediate_size)
    assert parameters(reloaded) < before
    # GQA: every KV group keeps the same number of query heads, each from that group.
    group = heads // kv
    assert config.num_attention_heads % config.num_key_value_heads == 0
    new_group = config.num_attention_heads // config.num_key_value_heads
    for index in plan.layers:
        kept = plan.heads[index]
        for g, kv_head in enumerate(plan.kv_heads[index]):
            assert all(h // group == kv_head for h in kept[g * new_group:(g + 1) * new_group])
    if CASES[name].get("head_mode") == "groups":
        assert (config.num_attention_heads, config.num_key_value_heads) == (heads // 2, kv // 2) and new_group == group
    else:
        assert config.num_key_value_heads == kv and new_group == group - 1


def test_the_least_important_parts_go(tiny_model_dirs):
    """A head whose output is zeroed, and a channel whose down_proj column is zeroed, score 0 and are removed."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], dtype=torch.float32).eval()
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[:, 3 * head_dim:4 * head_dim] = 0
        model.model.layers[0].mlp.down_proj.weight[:, 7] = 0
    importance = score(model, samples())
    assert float(importance.heads[1][3]) == 0 and float(importance.channels[0][7]) == 0
    plan = make_plan(model.config, importance, heads=0.5, mlp=0.01)
    assert 3 not in plan.heads[1] and 7 not in plan.channels[0]


@pytest.mark.parametrize("settings, message", [
    (dict(heads=0.1), "prune.heads (query heads per KV group)=0.1: rounds to removing none of 2"),
    (dict(heads=0.9, head_mode="groups"), "prune.heads (KV groups)=0.9: would remove all 2"),
    (dict(layers=0.9), "prune.layers=0.9: would remove all 2"),
])
def test_bad_ratios_fail_in_one_line(tiny_model_dirs, settings, message):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], dtype=torch.float32).eval()
    with pytest.raises(InputError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        make_plan(model.config, score(model, samples(2)), **settings)


def test_prune_command_writes_a_directory_that_exports(tiny_recipe, smollm2_shaped, tmp_path):
    """`dstune prune` on a recipe: a plain HF directory and its manifest; it exports to ONNX and GGUF, which decode
    as the pruned model does."""
    from cli_runner import run_cli
    from dstune.export.gguf import export_gguf, load_gguf
    from dstune.export.onnx import export_onnx, load_onnx

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(tiny_recipe()))
    out = tmp_path / "pruned"
    done, nothing = run_cli([
        ["prune", str(recipe), "--model", str(smollm2_shaped), "--out", str(out), "prune.heads=0.34", "prune.mlp=0.25",
         "prune.layers=0.25"],
        ["prune", str(recipe), "--model", str(smollm2_shaped)]])
    assert done.returncode == 0, done.stderr
    assert f"dstune: pruned model saved to {out}" in done.stdout
    manifest = json.loads((out / "dstune_prune.json").read_text())
    assert manifest["calibration"]["split"] == "train" and manifest["parameters"] < manifest["source_parameters"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (6, 3, 16)
    prompt = torch.tensor([[1, 400, 500, 600, 700]])
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=6, do_sample=False)[0, 5:].tolist()
        reference = model(prompt).logits
    onnx_model, _ = load_onnx(export_onnx(out, tmp_path / "onnx", "fp32"), out)
    assert onnx_model.greedy(prompt[0].tolist(), 6, set()) == expected
    gguf_model, _ = load_gguf(export_gguf(out, tmp_path / "gguf", "f32"), out)
    with torch.no_grad():
        assert torch.allclose(gguf_model(prompt).logits, reference, atol=1e-4)
    assert nothing.returncode == 2 and "prune: nothing to remove" in nothing.stderr
    assert "Traceback" not in nothing.stderr
