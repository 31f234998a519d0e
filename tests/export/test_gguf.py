"""GGUF export: what transformers reads back matches the source, the tokenizer and chat template survive, a merged
LoRA model scores the same from its GGUF, and a LoRA adapter alone is written the way llama.cpp reads it.

Logits error, ||logits - source|| / ||source|| on PROMPTS, measured on the tiny random Llama (Qwen2): f32 0 (bit-exact),
f16 1.2e-3 (1.0e-3), q8_0 3.1e-2 (2.8e-2), q4_0 0.49 (0.40). These models (2 layers, width 64, init range 0.2) amplify
weight noise ~6x; SmolLM2-135M gives f16 5.6e-4, q8_0 1.9e-2, q4_0 0.26. The bounds sit 2-4x above the tiny-model
figures; the weights themselves are checked exactly against gguf's own quantize -> dequantize.
"""

import json

import numpy as np
import pytest
import torch
import yaml

from cli_runner import run_cli
from dstune import api
from dstune.errors import InputError
from dstune.export.gguf import export_gguf, export_lora_adapter, load_gguf
from dstune.models.loading import load_model

# relative L2 error of the logits, per file type (tiny Llama measured: 0, 1.2e-3, 3.1e-2, 0.49)
LOGITS_TOLERANCE = {"f32": 0.0, "f16": 5e-3, "q8_0": 0.12, "q4_0": 1.0}
PROMPTS = ["The patient was admitted with chest pain.", "患者因胸痛入院。", "ICD-10 for type 2 diabetes: E11"]


def gguf_tensors(path):
    """{name: (ggml type, shape in torch order)}, read with transformers' metadata reader (fast)."""
    from transformers.integrations.gguf.reader import GgufHeader

    return {t.name: (t.ggml_type, t.shape) for t in GgufHeader.from_file(str(path)).tensors}


def gguf_metadata(path):
    from transformers.integrations.gguf.reader import read_gguf_metadata

    return read_gguf_metadata(str(path), ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))[0]


@pytest.fixture(scope="module")
def exported(tiny_model_dirs, tmp_path_factory):
    """{arch: {quant: file}}: the tiny Llama in every file type, the tiny Qwen2 in f32."""
    out = tmp_path_factory.mktemp("gguf")
    quants = {"llama": list(LOGITS_TOLERANCE), "qwen2": ["f32"]}  # f16 is written and its metadata checked
    return {arch: {q: export_gguf(tiny_model_dirs[arch], out / arch, q) for q in quants[arch]} for arch in quants}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_metadata_and_tensor_types_are_what_llama_cpp_reads(arch, exported, tiny_model_dirs, tokenizer_dir):
    quant = {"llama": "q4_0", "qwen2": "f32"}[arch]
    meta = gguf_metadata(exported[arch][quant])
    config = json.loads((tiny_model_dirs[arch] / "config.json").read_text())
    expected = {"general.architecture": arch, "general.type": "model", "general.file_type": 2 if quant == "q4_0" else 0,
                f"{arch}.block_count": 2, f"{arch}.context_length": 512, f"{arch}.embedding_length": 64,
                f"{arch}.feed_forward_length": 128, f"{arch}.attention.head_count": 4,
                f"{arch}.attention.head_count_kv": 2, f"{arch}.rope.dimension_count": 16,
                f"{arch}.rope.freq_base": 10000.0, "tokenizer.ggml.model": "gpt2",
                # what the loaded tokenizer does: transformers gives a Qwen2 directory Qwen2's split regex
                "tokenizer.ggml.pre": {"llama": "gpt-2", "qwen2": "qwen2"}[arch],
                "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.add_bos_token": False,
                "tokenizer.chat_template": (tokenizer_dir / "chat_template.jinja").read_text()}
    assert {k: meta.get(k) for k in expected} == expected
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"], rel=1e-6)
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and len(meta["tokenizer.ggml.merges"]) == 48900

    tensors = gguf_tensors(exported[arch][quant])
    bias = {"blk.1.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"}
    assert bias <= set(tensors) if arch == "qwen2" else not bias & set(tensors)
    assert len(tensors) == 2 * (9 + (3 if arch == "qwen2" else 0)) + 3
    # ggml types 0 F32, 2 Q4_0, 8 Q8_0: norms and biases stay F32; in q4_0 the output head is Q8_0 (llama-quantize)
    q4, q8 = (2, 8) if quant == "q4_0" else (0, 0)
    assert tensors["token_embd.weight"] == (q4, (49152, 64)) and tensors["output.weight"] == (q8, (49152, 64))
    assert tensors["blk.0.ffn_down.weight"] == (q4, (64, 128)) and tensors["blk.0.attn_k.weight"] == (q4, (32, 64))
    assert tensors["blk.0.attn_norm.weight"] == (0, (64,)) and tensors["output_norm.weight"] == (0, (64,))


# Reading a GGUF with a 49k-token vocabulary takes transformers seconds (per read; the config is a second read), so
# the quantizers, which do not depend on the architecture, are read back on Llama with its source config; Qwen2
# (biases, no Q/K permutation) in f32 with the config its GGUF gives. Llama's f32 file, config included, is read back
# in the evaluation test below.
@pytest.mark.parametrize(("arch", "quant"), [("llama", "q8_0"), ("llama", "q4_0"),
                                             ("qwen2", "f32")])
def test_transformers_reads_back_the_weights_and_logits(arch, quant, exported, tiny_model_dirs):
    """Each weight is exactly the source's through its ggml type's quantizer; logits within LOGITS_TOLERANCE."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, path = tiny_model_dirs[arch], exported[arch][quant]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source) if arch == "llama" else None
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                  dtype=torch.float32)
    names, types = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], 2), gguf_tensors(path)
    for name, weight in model.state_dict().items():
        # Quantization works row by row, so llama's Q/K row permutation (undone on load) changes nothing here.
        qtype = gguf.GGMLQuantizationType(types[names.get_name(name, try_suffixes=(".weight", ".bias"))][0])
        expected = gguf.quants.dequantize(gguf.quants.quantize(weight.numpy(), qtype), qtype)
        assert torch.equal(loaded.state_dict()[name], torch.from_numpy(expected)), name
    batch = AutoTokenizer.from_pretrained(source, padding_side="left")(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        reference, logits = model(**batch).logits, loaded(**batch).logits
    error = ((logits - reference).norm() / reference.norm()).item()
    assert error <= LOGITS_TOLERANCE[quant], error


@pytest.mark.parametrize(("steps", "name"), [
    (["Digits", "ByteLevel"], "smollm"),  # SmolLM2's own tokenizer.json
    (["QwenSplit", "ByteLevel"], "qwen2"),  # Qwen2 / DeepSeek-R1-Distill-Qwen
    (["ByteLevel"], "gpt-2"),  # what transformers rebuilds from a GGUF's byte-level vocabulary
    (["Metaspace"], None),  # sentencepiece style: no llama.cpp BPE pre-tokenizer
])
def test_pre_tokenizer_is_named_for_what_the_tokenizer_does(steps, name):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from dstune.export.gguf import tokenizer_pre

    made = {"Digits": pre_tokenizers.Digits(individual_digits=True),
            # after a split regex, byte-level mapping only; on its own, GPT-2's regex too
            "ByteLevel": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex="QwenSplit" not in steps),
            "QwenSplit": pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            "Metaspace": pre_tokenizers.Metaspace()}
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([made[s] for s in steps]) if len(steps) > 1 else made[steps[0]]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    if name is None:
        with pytest.raises(InputError, match="no pre-tokenizer matching"):
            tokenizer_pre(tokenizer)
    else:
        assert tokenizer_pre(tokenizer) == name


def test_registered_as_the_gguf_export_format():
    from dstune.export.formats import EXPORT_FORMATS

    fmt = EXPORT_FORMATS["gguf"]
    assert fmt.quants == ("f32", "f16", "q8_0", "q4_0") and (fmt.export, fmt.load) == (export_gguf, load_gguf)


def test_unsupported_architecture_is_a_one_line_input_error(tiny_model_dirs, tmp_path):
    with pytest.raises(InputError) as error:
        export_gguf(tiny_model_dirs["deepseek_v3"], tmp_path, "f16")
    message = str(error.value)
    assert "\n" not in message and "'deepseek_v3'" in message and "llama and qwen2" in message
    assert not list(tmp_path.iterdir())


def test_gguf_of_a_merged_lora_model_evaluates_like_the_merged_dir_and_the_adapter(tiny_recipe, tmp_path,
                                                                                  tokenizer_dir, monkeypatch):
    from transformers import AutoTokenizer

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe(train={"max_steps": 3})))
    adapter = api.train(str(recipe_path)).adapter_dir
    merged = api.merge(str(recipe_path), adapter=adapter)
    gguf_file = export_gguf(merged, tmp_path / "exports", "f32")
    cache = tmp_path / "cache"  # where `--model X.gguf` converts the file once
    runs = run_cli([["eval", str(recipe_path), "--model", str(gguf_file), "--tag", "gguf"],
                    ["eval", str(recipe_path), "--model", str(merged), "--tag", "merged"],
                    ["eval", str(recipe_path), "--adapter", str(adapter), "--tag", "adapter"]],
                   env={"DSTUNE_CACHE": str(cache)})
    assert all(run.returncode == 0 for run in runs), [run.stderr[-2000:] for run in runs]
    results = {tag: json.loads((tmp_path / "runs" / "tiny" / "eval" / f"{tag}.json").read_text())
               for tag in ("gguf", "merged", "adapter")}
    # f32: the same weights, so the same greedy answers and the same scores
    answers = {tag: [p["got"] for p in result["predictions"]] for tag, result in results.items()}
    assert answers["gguf"] == answers["merged"] == answers["adapter"] and len(answers["gguf"]) == 4
    assert results["gguf"]["metrics"] == results["merged"]["metrics"] == results["adapter"]["metrics"]

    # The export format's loader reuses that conversion: the tokenizer read back from the GGUF tokenizes and
    # renders chats as the source does.
    monkeypatch.setenv("DSTUNE_CACHE", str(cache))
    model, tokenizer = load_gguf(gguf_file, merged)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():  # f32: the logits of the merged model, bit for bit
        assert torch.equal(model(**batch).logits, load_model(merged)(**batch).logits)
    source = AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in PROMPTS + ["Hello, world! 12345 tokens", "今天天气很好，我们去公园散步吧。"]:
        assert tokenizer(text)["input_ids"] == source(text)["input_ids"], text
    chat = [{"role": "user", "content": "患者主诉头痛三天。"}, {"role": "assistant", "content": "R51"}]
    assert tokenizer.chat_template == source.chat_template
    assert tokenizer.apply_chat_template(chat, tokenize=False) == source.apply_chat_template(chat, tokenize=False)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|im_end|>")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_adapter_gguf_is_what_llama_cpp_applies(arch, exported, tiny_model_dirs, tmp_path):
    """lora_a/lora_b per adapted module, in llama.cpp's shapes, and base + alpha/r * B @ A == the merged model."""
    import gguf
    from gguf import GGUFReader
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    base_dir = tiny_model_dirs[arch]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(1)
    # init_lora_weights=False: B random, not zero, so every check below sees a real update
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    written = export_lora_adapter(tmp_path / "adapter", tmp_path / "adapter.gguf", base_dir)

    reader = GGUFReader(written)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert meta["general.architecture"] == arch and meta["general.type"] == "adapter"
    assert meta["adapter.type"] == "lora" and meta["adapter.lora.alpha"] == 8.0
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * len(targets) * 2  # A and B, 7 modules, 2 layers
    lora = {n: w for n, w in peft_model.state_dict().items() if "lora_" in n}
    kinds = dict(zip(targets, ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]))
    permute = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": 2})
    for name, weight in lora.items():
        layer, module = name.split("layers.")[1].split(".")[0], name.split(".lora_")[0].split(".")[-1]
        side = "a" if ".lora_A." in name else "b"
        tensor = tensors[f"blk.{layer}.{kinds[module]}.weight.lora_{side}"]
        # ggml order: lora_a (in, r), lora_b (r, out)
        assert list(tensor.shape) == list(reversed(weight.shape)), name
        value = torch.from_numpy(np.array(tensor.data))
        if arch == "llama" and side == "b" and module in ("q_proj", "k_proj"):
            # llama.cpp's Q/K row permutation reaches B (the output side); transformers' inverse undoes it
            value = torch.from_numpy(permute.process(value.numpy(), f"blk.0.attn_{module[0]}.weight").weights)
        assert torch.equal(value, weight), name

    # llama.cpp adds alpha / r * B @ A to the base's GGUF weight; in transformers' order that is the merged model.
    merged = peft_model.merge_and_unload().state_dict()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], 2)
    base = load_gguf_state_dict(GgufHeader.from_file(str(exported[arch]["f32"])))
    for name in (n for n in merged if n.endswith("_proj.weight")):
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        a, b = (torch.from_numpy(np.array(tensors[f"{gguf_name}.lora_{s}"].data)) for s in "ab")
        applied = (base[gguf_name][...] + 8 / 4 * b @ a).numpy()
        if arch == "llama":
            applied = permute.process(applied, gguf_name).weights
        assert torch.allclose(torch.from_numpy(applied), merged[name], atol=1e-6), name
