"""The memory planner: its trace counts what autograd really keeps, its arithmetic shards as each strategy does, and
the shipped DeepSeek recipes validate and plan from their configs alone (no weights)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from dstune.config import load_recipe
from dstune.errors import InputError
from dstune.scale import plan as planner
from dstune.scale.plan import Layout, load_model_config, meta_training_model, plan_training, trace_activations

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny import tiny_config  # noqa: E402

ROOT = Path(__file__).parents[2]


def real_saved_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward in a real CPU forward pass (each storage once, weights excluded)."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, logits_to_keep=torch.empty(0, dtype=torch.long), output_hidden_states=True)
    return sum(seen.values())


@pytest.mark.parametrize("model_type,fused,dropout,tolerance", [
    ("llama", True, 0.1, 0.0), ("qwen2", False, 0.0, 0.0),
    # MoE routing keeps a few token-sized index tensors the stand-in does not reproduce exactly.
    ("deepseek_v3", False, 0.0, 0.06),
])
def test_meta_trace_counts_what_a_real_forward_keeps(model_type, fused, dropout, tolerance):
    from transformers import AutoModelForCausalLM

    from dstune.train.fastlora import enable_fused_lora
    from dstune.tuners.methods import add_method

    config = tiny_config(model_type, 1000)
    recipe = load_recipe({"name": "t", "train": {"fused_lora": fused, "lora": {"dropout": dropout}, "packing": False}})
    trace = trace_activations(meta_training_model(recipe, config), 2, 64, packing=False)
    torch.manual_seed(0)
    real = add_method(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa"), recipe.train)
    if fused:
        assert enable_fused_lora(real)
    real.train()
    measured = real_saved_bytes(real, torch.randint(0, 1000, (2, 64)))
    predicted = sum(trace.per_layer) + trace.outside
    assert measured > 0 and abs(predicted / measured - 1) <= tolerance, (predicted, measured)


def test_checkpointing_keeps_layer_inputs_and_one_layer():
    trace = planner.Trace(per_layer=[100, 300, 200], outside=7, layer_input=10)
    assert trace.activations(checkpointing=False) == 607
    assert trace.activations(checkpointing=True) == 3 * 10 + 300 + 7


def r1_recipe():
    recipe = load_recipe(ROOT / "recipes" / "deepseek_r1_14b_qlora.yaml")
    return recipe, load_model_config(recipe.model.name_or_path)


def test_r1_14b_qlora_recipe_validates_and_fits_one_80gb_gpu_from_its_config():
    recipe, config = r1_recipe()
    assert recipe.model.template == "deepseek-r1" and recipe.model.load_in_4bit
    assert config.model_type == "qwen2" and config.num_hidden_layers == 48  # the shipped config, no weights
    qlora = plan_training(recipe, config, Layout())
    assert 14.5e9 < qlora.parameters < 15e9
    # LoRA r16 on the 7 linears of 48 layers: r * (in + out) per linear.
    per_layer = 16 * ((5120 + 5120) * 2 + (5120 + 1024) * 2 + (5120 + 13824) * 2 + (13824 + 5120))
    assert qlora.trainable == 48 * per_layer
    assert qlora.training_peak < 80 * 2**30
    assert qlora.components["adapter"] == qlora.trainable * 4  # fp32 adapters over the bf16/NF4 base


def test_nf4_weights_and_sharding_follow_the_strategy():
    recipe, config = r1_recipe()
    config.num_hidden_layers = 2  # the arithmetic, on two of the 14B's layers
    bf16 = recipe.model_copy(update={"model": recipe.model.model_copy(update={"load_in_4bit": False})})
    qlora, lora = plan_training(recipe, config, Layout()), plan_training(bf16, config, Layout())
    embeddings = 2 * 152064 * 5120  # embed_tokens and lm_head stay in bf16
    linear = lora.parameters - embeddings - lora.trainable
    assert lora.components["weights"] == pytest.approx(2 * (lora.parameters - lora.trainable), rel=1e-6)
    assert qlora.components["weights"] == pytest.approx(2 * embeddings + planner.NF4_BYTES * linear, rel=1e-3)
    ddp, zero2, fsdp2 = (plan_training(bf16, config, Layout(gpus=8, strategy=s)) for s in ("ddp", "zero2", "fsdp2"))
    assert ddp.components["weights"] == lora.components["weights"]
    assert ddp.components["optimizer"] == lora.components["optimizer"] == 2 * lora.components["gradients"]
    assert zero2.components["weights"] == lora.components["weights"]
    assert zero2.components["optimizer"] == pytest.approx(lora.components["optimizer"] / 8)
    assert zero2.components["gradients"] == pytest.approx(lora.components["gradients"] / 8)
    layer = (lora.components["weights"] - 2 * embeddings + lora.components["adapter"]) / 2  # gathered with its LoRA
    assert fsdp2.components["weights"] == pytest.approx(lora.components["weights"] / 8 + 2 * layer, rel=1e-3)
    assert fsdp2.components["activations"] == lora.components["activations"]  # each rank runs its own batch


def test_v3_lora_recipe_validates_and_fits_64_gpus_with_expert_parallelism():
    recipe = load_recipe(ROOT / "recipes" / "deepseek_v3_lora.yaml")
    config = load_model_config(recipe.model.name_or_path)
    assert config.model_type == "deepseek_v3" and config.n_routed_experts == 256
    ep = plan_training(recipe, config, Layout(gpus=8, nodes=8, strategy="fsdp2", expert_parallel=64))
    assert 660e9 < ep.parameters < 690e9 and ep.trainable > 0
    assert ep.training_peak < 80 * 2**30
    experts = 58 * 256 * 3 * 7168 * 2048 * 2  # routed experts of the 58 MoE layers, bf16
    assert ep.components["weights"] > experts / 64  # each GPU holds its 4 experts per layer, ungathered
    kv = ep.kv_cache_per_token
    assert kv["mla_latent"] < kv["transformers"] / 50  # MLA's latent cache (vLLM) against the expanded one


def test_config_lookup_names_what_it_accepts(tmp_path):
    with pytest.raises(InputError, match="no shipped config is named 'my-model'.*deepseek-v3"):
        load_model_config("models/My-Model")
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                       "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 100}))
    assert load_model_config("models/My-Model", str(config_file)).hidden_size == 64
    with pytest.raises(InputError, match="--gpu: 'h900'"):
        planner.check_request(planner.PlanRequest(gpu="h900"))


def test_cli_plan_prints_json_with_advice_and_refuses_bad_options(tmp_path):
    from cli_runner import run_cli

    recipe = str(ROOT / "recipes" / "deepseek_r1_14b_qlora.yaml")
    config = tmp_path / "two_layers.json"  # the 14B's shape, two layers deep: a quick plan
    values = json.loads((planner.CONFIG_DIR / "deepseek-r1-distill-qwen-14b.json").read_text())
    config.write_text(json.dumps({**values, "num_hidden_layers": 2}))
    result, bad = run_cli([["plan", recipe, "--config", str(config), "--gpu-memory", "6GB", "--json",
                            "train.batch_size=4", "train.gradient_checkpointing=false"],
                           ["plan", recipe, "--strategy", "zero9"]])
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["fits"] is False and plan["advice"], plan  # batch 4 without checkpointing: advice follows
    assert any("gradient_checkpointing=true" in line for line in plan["advice"])
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--strategy" in bad.stderr, bad.stderr
