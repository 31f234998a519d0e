"""Pins: the library internals dstune relies on, each checked as the code uses it, so an upgrade fails here first.

pyproject.toml caps peft, transformers, accelerate and onnxruntime-genai at the newest minor version CI has run.
To raise a cap: install the new version, run this file, and follow the message of each failure (it names the dstune
code that relies on the internal and what to do); then run the tests it names. Cheap: tiny models, no training.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch
from torch import nn


def pin(ok: bool, changed: str, todo: str) -> None:
    """Fail with what changed in the library and what to do about it."""
    assert ok, f"PIN BROKEN: {changed}\nWHAT TO DO: {todo}"


def internal(module: str, name: str, todo: str):
    """`module.name`, or a pin failure saying it is gone."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pass
    pin(False, f"{module}.{name} is gone", todo)


@pytest.fixture(scope="module")
def tiny_llama():
    """A tiny random Llama (GQA: 4 query heads, 2 key/value heads), built from its config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


# --- peft -----------------------------------------------------------------------------------------------------------

def test_peft_type_enum_takes_dstune_bottleneck_member():
    from peft.utils import PeftType, register_peft_method

    # The private enum tables tuners/bottleneck/peft_type.py writes the new member into.
    for table, kind in (("_member_map_", dict), ("_value2member_map_", dict), ("_member_names_", list)):
        pin(isinstance(getattr(PeftType, table, None), kind),
            f"peft's PeftType (Python's Enum) has no {table} {kind.__name__} any more",
            "rewrite _extend_peft_type in src/dstune/tuners/bottleneck/peft_type.py for the new Enum internals, or "
            "use peft's own way to add a PeftType if it has one now; then run tests/tuners/test_bottleneck.py")
    pin(issubclass(PeftType, str), "PeftType is no longer a str Enum", "peft_type.py builds members with "
        "str.__new__: adapt it; then run tests/tuners/test_bottleneck.py")
    from dstune.tuners.bottleneck.peft_type import BOTTLENECK

    pin(PeftType("BOTTLENECK") is BOTTLENECK and PeftType["BOTTLENECK"] is BOTTLENECK
        and PeftType.BOTTLENECK is BOTTLENECK and BOTTLENECK in list(PeftType) and BOTTLENECK == "BOTTLENECK",
        "the PeftType member dstune adds is not found by value, name, attribute or iteration",
        "fix _extend_peft_type (src/dstune/tuners/bottleneck/peft_type.py): peft looks members up all these ways "
        "(register_peft_method, adapter_config.json's peft_type on load)")
    # Why the patch exists: peft refuses to register a method whose name is not a PeftType member.
    with pytest.raises(ValueError, match="PeftType"):
        register_peft_method(name="dstunepin", config_cls=object, model_cls=object)


def test_peft_registers_the_bottleneck_method_under_its_member():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    from dstune.tuners.bottleneck import BottleneckConfig, BottleneckModel

    member = PeftType("BOTTLENECK")
    pin(PEFT_TYPE_TO_CONFIG_MAPPING.get(member) is BottleneckConfig
        and PEFT_TYPE_TO_TUNER_MAPPING.get(member) is BottleneckModel
        and PEFT_TYPE_TO_PREFIX_MAPPING.get(member) == "bottleneck_",
        "peft's method registries (peft.mapping.PEFT_TYPE_TO_*_MAPPING) do not hold the bottleneck method",
        "check peft's register_peft_method and how dstune.tuners.bottleneck calls it; then run "
        "tests/tuners/test_bottleneck.py")


def test_peft_base_tuner_hooks_keep_the_signatures_bottleneck_overrides():
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

    from dstune.tuners.bottleneck import BottleneckModel

    _get_submodules = internal("peft.tuners.tuners_utils", "_get_submodules",
                               "BottleneckModel._unload_and_optionally_merge (src/dstune/tuners/bottleneck/model.py) "
                               "uses it to find (parent, target, name): use peft's replacement")

    expected = {
        "_create_and_replace": ["self", "peft_config", "adapter_name", "target", "target_name", "parent",
                                "current_key"],
        "_unload_and_optionally_merge": ["self", "merge", "progressbar", "safe_merge", "adapter_names"],
        "_replace_module": ["self", "parent", "child_name", "new_module", "child"],
    }
    for name, params in expected.items():
        got = list(inspect.signature(getattr(BaseTuner, name)).parameters)
        pin(got[:len(params)] == params, f"peft's BaseTuner.{name} parameters are now {got}, not {params}",
            f"update BottleneckModel.{name} (src/dstune/tuners/bottleneck/model.py) to the new signature; then run "
            "tests/tuners/test_bottleneck.py")
    pin(not getattr(BottleneckModel, "__abstractmethods__", None),
        f"BaseTuner gained abstract methods BottleneckModel lacks: {sorted(BottleneckModel.__abstractmethods__)}",
        "implement them in src/dstune/tuners/bottleneck/model.py")
    pin(list(inspect.signature(_get_submodules).parameters) == ["model", "key"],
        "peft.tuners.tuners_utils._get_submodules changed its signature",
        "BottleneckModel._unload_and_optionally_merge uses it to find (parent, target, name): adapt it")
    # BottleneckLayer sets these two private fields; BaseTunerLayer's properties read them.
    layer = BaseTunerLayer.__new__(BaseTunerLayer)
    layer._active_adapter, layer._disable_adapters = "pin", True
    pin(layer.active_adapters == ["pin"] and layer.disable_adapters is True,
        "BaseTunerLayer no longer reads active_adapters / disable_adapters from _active_adapter / _disable_adapters",
        "set the fields peft's BaseTunerLayer uses now in BottleneckLayer.__init__ (tuners/bottleneck/layer.py)")


def test_peft_moe_target_rewrite_is_switched_off_by_clearing_its_table():
    from peft import LoraConfig

    from dstune.tuners.lora import keep_moe_targets

    todo = ("keep_moe_targets (src/dstune/tuners/lora.py) clears it so that DeepSeek-V3's shared-expert and dense-MLP "
            "gate/up/down_proj keep their LoRA: find peft's new switch for the v4->v5 MoE target rewrite; then run "
            "tests/tuners/test_lora.py (the DeepSeek-V3 targets)")
    module = "peft.utils.transformers_weight_conversion"
    pin(isinstance(internal(module, "_MOE_FUSED_TARGETS", todo), dict), f"{module}._MOE_FUSED_TARGETS is no dict",
        todo)
    conversion = importlib.import_module(module)

    class DeepSeekV3:  # all the rewrite reads of a model with list targets: its model_type
        config = type("Config", (), {"model_type": "deepseek_v3"})()

    targets = {"q_proj", "gate_proj", "up_proj", "down_proj"}

    def converted() -> set[str]:
        config = LoraConfig(r=4, target_modules=sorted(targets))
        conversion.convert_peft_config_for_transformers(config, DeepSeekV3(), None)
        return set(config.target_modules)

    pin(converted() != targets, "peft no longer rewrites deepseek_v3's gate_proj/up_proj/down_proj LoRA targets",
        "keep_moe_targets (src/dstune/tuners/lora.py) may be unnecessary now: check tests/tuners/test_lora.py's "
        "DeepSeek-V3 test without it, and drop it if it passes")
    with keep_moe_targets():
        kept = converted()
    pin(kept == targets, f"with _MOE_FUSED_TARGETS cleared, peft still rewrote the targets to {sorted(kept)}",
        "keep_moe_targets (src/dstune/tuners/lora.py) no longer stops the rewrite: find what peft's "
        "_convert_peft_config_moe checks now")
    pin(conversion._MOE_FUSED_TARGETS, "keep_moe_targets did not restore peft's table", "fix its finally clause")


def test_peft_lora_linear_has_what_the_fused_and_qat_classes_use():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear

    model = get_peft_model(nn.Sequential(nn.Linear(8, 6)), LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    layer = model.base_model.model[0]
    pin(type(layer) is Linear, f"peft wraps an nn.Linear in {type(layer).__name__}, not peft.tuners.lora.layer.Linear",
        "enable_fused_lora and enable_qat (src/dstune/train/) swap exactly that class: point peft_lora_linear at "
        "the new one; then run tests/train/test_fastlora.py and tests/train/test_qat.py")
    base = layer.get_base_layer()
    nn.init.normal_(layer.lora_B["default"].weight)
    for name in ("lora_A", "lora_B", "lora_dropout", "scaling", "lora_variant", "lora_bias", "fan_in_fan_out",
                 "disable_adapters", "merged", "active_adapters", "get_base_layer", "get_delta_weight"):
        pin(hasattr(layer, name), f"peft's LoRA Linear has no {name!r}",
            "FastLoraLinear (src/dstune/train/fastlora.py) and QatLoraLinear (src/dstune/train/qat.py) subclass "
            "it and read it: adapt them; then run tests/train/test_fastlora.py and tests/train/test_qat.py")
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    pin(torch.allclose(layer.get_delta_weight("default"), s * b @ a),
        "peft's LoRA delta weight is no longer scaling * B @ A", "QatLoraLinear.merged_weight relies on it")
    x = torch.randn(3, 8)
    pin(torch.allclose(layer(x), base(x) + s * (x @ a.t() @ b.t()), atol=1e-6),
        "peft's LoRA Linear forward is no longer base(x) + scaling * B(A(dropout(x)))",
        "LoraLinearFunction (src/dstune/train/fastlora.py) computes that formula: check it against peft's forward")

    class Swapped(Linear):
        pass

    layer.__class__ = Swapped  # what enable_fused_lora and enable_qat do to each layer
    layer.__class__ = Linear
    pin(type(layer) is Linear, "a peft LoRA Linear's class cannot be swapped", "see train/fastlora.py")


def test_peft_prefix_model_has_the_layout_and_fields_prefix_causal_lm_reads(tiny_llama):
    from peft import PeftModelForCausalLM, PrefixTuningConfig, TaskType, get_peft_model

    model = get_peft_model(tiny_llama, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3))
    todo = ("PrefixCausalLM (src/dstune/tuners/prefix.py; prefix_model.py after the plugin rewrite) takes over "
            "peft's prefix model by swapping __class__ and reads these fields: adapt it; then run "
            "tests/tuners/test_prefix.py")
    pin(type(model) is PeftModelForCausalLM, f"get_peft_model gives {type(model).__name__} for a causal LM", todo)
    for name in ("prompt_encoder", "prompt_tokens", "peft_config", "base_model_torch_dtype", "active_adapter",
                 "active_peft_config", "base_model_prepare_inputs_for_generation", "get_base_model", "base_model"):
        pin(hasattr(model, name), f"peft's PeftModelForCausalLM has no {name!r}", todo)
    config = model.peft_config["default"]
    for name in ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim", "inference_mode",
                 "prefix_projection"):
        pin(hasattr(config, name), f"peft's PrefixTuningConfig has no {name!r}", todo)
    # PrefixCausalLM._adapter_key_values: the encoder's [tokens, layers * 2 * heads * head_dim] output viewed as
    # [layers * 2, heads, tokens, head_dim], keys of layer l at row 2l and values at 2l + 1.
    encoder = model.prompt_encoder["default"]
    values = encoder(model.prompt_tokens["default"][: config.num_virtual_tokens].unsqueeze(0))[0]
    heads = config.num_attention_heads
    rows = values.view(config.num_virtual_tokens, config.num_layers * 2, heads, config.token_dim // heads)
    rows = rows.permute(1, 2, 0, 3)
    cache = model.get_prompt(batch_size=1)
    for layer in range(config.num_layers):
        pin(torch.equal(cache.layers[layer].keys[0], rows[2 * layer])
            and torch.equal(cache.layers[layer].values[0], rows[2 * layer + 1]),
            "peft's get_prompt no longer lays the prefix out as [layers * 2, heads, tokens, head_dim]", todo)
    pin(heads == tiny_llama.config.num_key_value_heads,
        "peft's prefix config counts query heads, not key/value heads, for a GQA model", todo)


def test_transformers_cache_keyword_and_cache_api(tiny_llama):
    from transformers import DynamicCache

    from_signature = inspect.signature(type(tiny_llama).forward).parameters
    key = "cache" if "cache" in from_signature else "past_key_values"
    todo = ("src/dstune/tuners/prefix.py (_cache_keyword, PrefixCausalLM.forward / prepare_inputs_for_generation) "
            "passes the prefix cache under this keyword: adapt it; then run tests/tuners/test_prefix.py")
    pin(key in from_signature, "a causal LM's forward takes neither `cache` nor `past_key_values`", todo)
    cache = DynamicCache(config=tiny_llama.config)
    k = torch.randn(1, 2, 3, 8)
    cache.update(k, k + 1, 0)
    pin(cache.get_seq_length() == 3 and torch.equal(cache.layers[0].keys, k) and torch.equal(cache.layers[0].values,
                                                                                             k + 1),
        "DynamicCache(config=...).update / get_seq_length / layers[i].keys and .values changed", todo)
    ids = torch.tensor([[1, 2, 3, 4]])
    prepared = tiny_llama.prepare_inputs_for_generation(ids, **{key: cache}, attention_mask=torch.ones_like(ids))
    pin(prepared.get(key) is cache, f"prepare_inputs_for_generation does not hand the cache back under {key!r}", todo)


# --- transformers ---------------------------------------------------------------------------------------------------

def test_transformers_gguf_internals_the_model_loader_reads(tmp_path):
    import gguf

    todo = "src/dstune/models/loading.py (_unsupported_gguf, convert_gguf) reads it: adapt it; then run " \
           "tests/models/test_safe_loading.py"
    module = "transformers.modeling_gguf_pytorch_utils"
    GGUF_SUPPORTED_ARCHITECTURES = internal(module, "GGUF_SUPPORTED_ARCHITECTURES", todo)
    load_gguf_checkpoint = internal(module, "load_gguf_checkpoint", todo)
    pin("llama" in GGUF_SUPPORTED_ARCHITECTURES and all(isinstance(a, str) for a in GGUF_SUPPORTED_ARCHITECTURES),
        "transformers.modeling_gguf_pytorch_utils.GGUF_SUPPORTED_ARCHITECTURES is no list of architecture names", todo)
    path = tmp_path / "pin.gguf"
    writer = gguf.GGUFWriter(str(path), arch="dstunepin")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    field = gguf.GGUFReader(path).fields["general.architecture"]
    pin(bytes(field.parts[field.data[0]]).decode() == "dstunepin",
        "gguf's GGUFReader field layout (parts[data[0]]) changed", todo)
    with pytest.raises((ValueError, KeyError)) as error:
        load_gguf_checkpoint(str(path), return_tensors=False)
    pin("is not supported" in str(error.value),
        f"transformers' error for a GGUF architecture it cannot read is now {str(error.value)[:200]!r}",
        "convert_gguf (src/dstune/models/loading.py) matches 'is not supported' to give its one-line error: "
        "match the new text")


def test_transformers_remote_code_refusal_names_trust_remote_code(tmp_path):
    from transformers import AutoConfig

    CONFIG_MAPPING = internal("transformers.models.auto.configuration_auto", "CONFIG_MAPPING",
                              "_custom_code (src/dstune/models/loading.py) tells built-in architectures from custom "
                              "code with it: use transformers' new registry")
    pin("llama" in CONFIG_MAPPING and "dstunepin" not in CONFIG_MAPPING,
        "transformers' CONFIG_MAPPING no longer answers `model_type in CONFIG_MAPPING`",
        "_custom_code (src/dstune/models/loading.py) uses it to tell built-in architectures from custom code")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dstunepin",
                                                      "auto_map": {"AutoConfig": "configuration_pin.PinConfig"}}))
    (tmp_path / "configuration_pin.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(ValueError) as error:
        AutoConfig.from_pretrained(tmp_path, trust_remote_code=False)
    pin("trust_remote_code" in str(error.value),
        "transformers' refusal of custom code no longer mentions trust_remote_code",
        "load_tokenizer / load_model (src/dstune/models/loading.py) match that text to give their one-line error: "
        "match the new text; then run tests/models/test_safe_loading.py")


def test_transformers_from_pretrained_takes_weights_only():
    from transformers import PreTrainedModel

    pin("weights_only" in inspect.signature(PreTrainedModel.from_pretrained).parameters,
        "PreTrainedModel.from_pretrained has no weights_only parameter",
        "load_model (src/dstune/models/loading.py) passes weights_only=True so that allowed pickles load through "
        "torch's safe unpickler: find the new way; then run tests/models/test_safe_loading.py")


def test_transformers_config_names_its_attention_implementation(tiny_llama):
    pin(getattr(tiny_llama.config, "_attn_implementation", None) in ("sdpa", "eager"),
        "a model config's _attn_implementation is gone (or not sdpa/eager on a plain CPU model)",
        "the training loop hands it to PackingCollator (src/dstune/train/packing.py), which picks the packed "
        "mask's form from it: find the new attribute; then run tests/train/test_packing.py")


def test_transformers_safe_globals_lets_a_numpy_rng_state_load(tmp_path):
    import numpy as np

    safe_globals = internal("transformers.trainer_pt_utils", "safe_globals",
                            "check_checkpoint (src/dstune/train/checkpoint.py) test-loads pickles with it: use "
                            "torch.serialization.safe_globals with numpy's types directly")
    path = tmp_path / "rng_state.pth"
    torch.save({"numpy": np.random.get_state()}, path)
    with safe_globals():
        state = torch.load(path, weights_only=True)
    pin(state["numpy"][0] == "MT19937", "transformers.trainer_pt_utils.safe_globals no longer allows numpy's RNG state",
        "check_checkpoint (src/dstune/train/checkpoint.py) test-loads a checkpoint's pickles with it: use "
        "torch.serialization.safe_globals with numpy's types directly")


def test_gguf_export_reads_pre_tokenizer_splits_and_tokenizers_state():
    from tokenizers import pre_tokenizers

    todo = "tokenizer_pre (src/dstune/export/gguf.py) reads it to name llama.cpp's pre-tokenizer: adapt it; then " \
           "run tests/export/test_gguf.py"
    GGUF_PRE_TOKENIZER_SPLITS = internal("transformers.integrations.gguf.gguf_tokenizer_mapping",
                                         "GGUF_PRE_TOKENIZER_SPLITS", todo)
    pin(isinstance(GGUF_PRE_TOKENIZER_SPLITS, dict) and GGUF_PRE_TOKENIZER_SPLITS
        and all(isinstance(k, str) and isinstance(v, str) for k, v in GGUF_PRE_TOKENIZER_SPLITS.items()),
        "transformers' GGUF_PRE_TOKENIZER_SPLITS is no longer a {name: split regex} dict", todo)
    state = json.loads(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel()]).__getstate__())
    pin([s.get("type") for s in state.get("pretokenizers", [])] == ["Digits", "ByteLevel"]
        and state["pretokenizers"][0].get("individual_digits") is True,
        "a tokenizers pre-tokenizer's __getstate__ is no longer its tokenizer.json entry", todo)


# --- torch and torchao ----------------------------------------------------------------------------------------------

def test_torch_private_helpers_the_cache_and_qat_use():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    todo = "model_fingerprint (src/dstune/evaluate/cache.py) hashes a quantized weight's inner tensors: adapt it; " \
           "then run tests/evaluate/test_cache.py"
    is_traceable_wrapper_subclass = internal("torch.utils._python_dispatch", "is_traceable_wrapper_subclass", todo)
    linear = nn.Linear(32, 32)
    quantize_(linear, Int8WeightOnlyConfig())
    weight = linear.weight.detach()
    pin(is_traceable_wrapper_subclass(weight) and not is_traceable_wrapper_subclass(torch.zeros(1)),
        "torch.utils._python_dispatch.is_traceable_wrapper_subclass no longer tells torchao's weights apart", todo)
    inner, _ = weight.__tensor_flatten__()
    pin(inner and all(isinstance(getattr(weight, name), torch.Tensor) for name in inner),
        "a torchao weight's __tensor_flatten__ no longer names tensor attributes", todo)
    t = torch.zeros(3)
    before = t._version
    t.add_(1)
    pin(t._version > before, "torch.Tensor._version no longer counts in-place updates",
        "QatLoraLinear.quantized_weight (src/dstune/train/qat.py) keys its cache on it: key it on something else")


def test_torchao_quant_primitives_keep_the_arguments_qat_passes():
    todo = ("fake_quantize_int8 (src/dstune/train/qat.py) calls torchao's quant primitives to dequantize as "
            "torchao's Int8Tensor does: match it to torchao's new API; then run tests/train/test_qat.py")
    for name in ("MappingType", "choose_qparams_affine", "quantize_affine", "dequantize_affine"):
        internal("torchao.quantization.quant_primitives", name, todo)
    from dstune.train.qat import fake_quantize_int8

    weight = torch.randn(4, 16)
    try:
        got = fake_quantize_int8(weight)
    except TypeError as exc:
        pin(False, f"torchao's quant primitives refuse fake_quantize_int8's arguments ({exc})", todo)
    scale = weight.abs().amax(1, keepdim=True) / 127.5  # torchao's symmetric int8: range [-128, 127] over 255 steps
    pin(got.shape == weight.shape and (got - weight).abs().max() <= scale.max() * 0.51 + 1e-6,
        "fake_quantize_int8 no longer reproduces per-row symmetric int8", todo)


# --- onnxruntime-genai ----------------------------------------------------------------------------------------------

def _builder_dir() -> Path:
    return Path(importlib.util.find_spec("onnxruntime_genai").submodule_search_locations[0]) / "models"


def test_onnx_builder_functions_keep_the_arguments_export_passes():
    # Read, not imported: importing the builder costs ~10 s (it imports transformers, torch and torchao).
    tree = ast.parse((_builder_dir() / "builder.py").read_text(encoding="utf-8"))
    functions = {node.name: [a.arg for a in node.args.args] for node in tree.body if isinstance(node, ast.FunctionDef)}
    todo = "export_onnx (src/dstune/export/onnx.py) calls it positionally: adapt the call; then run " \
           "tests/export/test_onnx.py"
    expected = ["model_name", "input_path", "output_dir", "precision", "execution_provider", "cache_dir"]
    pin(functions.get("create_model", [])[:6] == expected,
        f"onnxruntime_genai.models.builder.create_model takes {functions.get('create_model')}", todo)
    pin(functions.get("parse_extra_options", [])[:7] == [*expected, "extra_options"],
        f"onnxruntime_genai.models.builder.parse_extra_options takes {functions.get('parse_extra_options')}", todo)


def test_onnx_builder_reads_the_options_export_sets():
    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path, as export_onnx does)

    from dstune.export.onnx import BUILDER_OPTIONS

    todo = ("BUILDER_OPTIONS (src/dstune/export/onnx.py) would be silently ignored (the builder passes unknown "
            "options through): rename them to the builder's new names; then run tests/export/test_onnx.py")
    # The builder's own modules (its folder is on sys.path), which this test reads the options through.
    normalize_builder_config = internal("builder_config", "normalize_builder_config", todo)
    QuantConfig = internal("quantization", "QuantConfig", todo)
    for quant, options in BUILDER_OPTIONS.items():
        extra = {**options, "hf_token": "false", "hf_remote": "false"}
        passed = normalize_builder_config(quant, "cpu", dict(extra)).extra_options
        pin(all(passed.get(k) == v for k, v in extra.items()),
            f"the builder's option normalization dropped or changed {quant} options: {passed}", todo)
        if "op_types_to_quantize" in extra:  # check_extra_options splits it before the model reads it
            extra["op_types_to_quantize"] = tuple(extra["op_types_to_quantize"].split("/"))
        weights = QuantConfig.from_extra_options(extra, quant, "cpu").weights
        if quant == "fp32":
            continue
        pin(weights.type == quant and weights.block_size == int(options["block_size"])
            and weights.accuracy_level == int(options["accuracy_level"]),
            f"the builder's quantization config read {quant} options as {weights}", todo)
        if quant == "int8":
            pin(weights.op_types == ("MatMul",),
                "the builder's int8 now quantizes more than MatMul (the embedding too?)",
                "quantize_embedding (src/dstune/export/onnx.py) swaps the int8 export's fp32 embedding Gather for "
                "an int8 one; if the builder does this itself now, drop it; then run tests/export/test_onnx.py")
        if quant == "int4":
            pin(set(weights.op_types) == {"MatMul", "Gather"}
                and any(o.match == {"preset": "mixed_layers"} and o.type == "int8" for o in weights.overrides),
                f"the builder reads int4's op types / mixed_layers:int8 as {weights}", todo)


def test_onnxruntime_genai_runtime_api_the_wrapper_calls():
    import onnxruntime_genai as og

    for owner, names in ((og, ("Config", "Model", "GeneratorParams", "Generator")),
                         (og.Config, ("overlay",)), (og.GeneratorParams, ("set_search_options",)),
                         (og.Generator, ("append_tokens", "generate_next_token", "get_next_tokens", "is_done"))):
        for name in names:
            pin(hasattr(owner, name), f"onnxruntime_genai has no {getattr(owner, '__name__', owner)}.{name}",
                "GenaiModel (src/dstune/export/onnx.py) calls it: adapt it; then run tests/export/test_onnx.py")
