"""GGUF export for llama.cpp and Ollama: a merged Llama or Qwen2 model, or a LoRA adapter alone.

The file is what llama.cpp's convert_hf_to_gguf.py (and llama-quantize, for q4_0) would write: the same metadata
keys, the same "gpt2" BPE tokenizer entries, the same tensor names, and the row permutation of Q and K that
llama.cpp's rotary embedding expects for the llama architecture (transformers' GGUF loader undoes it).
1-D tensors and norms stay F32. The logits transformers reads back are the source's exactly in f32; the relative
error of the other types is measured in tests/export/test_gguf.py and docs/deploy.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import InputError
from ..models.loading import load_model, load_tokenizer, resolve_model_path
from ..plugins import EXPORTS
from .formats import ExportFormat

ARCHITECTURES = ("llama", "qwen2")
QUANTS = ("f32", "f16", "q8_0", "q4_0")
# The projections a LoRA adapter may adapt, by their GGUF names (what llama.cpp applies adapters to here).
LORA_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _architecture(config, where: Path) -> str:
    if config.model_type not in ARCHITECTURES:
        raise InputError(f"{where}: GGUF export supports the {' and '.join(ARCHITECTURES)} architectures, "
                         f"not {config.model_type!r}")
    return config.model_type


def _rope(config) -> tuple[float, str]:
    """The rotary base and scaling type, from transformers 5's rope_parameters or older configs' keys."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta), rope.get("rope_type", rope.get("type", "default"))


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row order for the llama architecture: each head's two rotary halves interleaved."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def _llama_permutation(config, gguf_name: str):
    """The head count to permute a llama Q or K tensor by, or None for every other tensor."""
    if config.model_type != "llama":
        return None
    if ".attn_q." in gguf_name:
        return config.num_attention_heads
    if ".attn_k." in gguf_name:
        return config.num_key_value_heads or config.num_attention_heads
    return None


def tensor_type(gguf_name: str, shape: tuple[int, ...], quant: str, tied: bool):
    """The ggml type llama.cpp gives this tensor in a file of type `quant`."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

    # Most of llama.cpp handles 1-D tensors and norms in F32 only; biases are never quantized either.
    if len(shape) < 2 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return T.F32
    wanted = {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]
    # llama-quantize keeps the output projection (the embedding, when tied) finer: Q6_K, or Q8_0 where rows are
    # not a multiple of 256. gguf-py has no Q6_K quantizer, so Q8_0 it is.
    if wanted == T.Q4_0 and (gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")):
        wanted = T.Q8_0
    # A row that does not split into whole blocks falls back to F16, as in convert_hf_to_gguf.py.
    return T.F16 if shape[-1] % GGML_QUANT_SIZES[wanted][0] else wanted


def tokenizer_pre(tokenizer) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE (`tokenizer.ggml.pre`)."""
    # llama.cpp names it from a hash of one sample's ids; reading the pre_tokenizer itself names a tokenizer that
    # transformers rebuilt from a GGUF (plain byte-level, where SmolLM2's own splits digits) for what it does.
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    backend = tokenizer.backend_tokenizer.pre_tokenizer
    pre = json.loads(backend.__getstate__()) if backend is not None else {}  # its tokenizer.json entry
    steps = pre.get("pretokenizers", [pre])
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        # the first of transformers' names for a split regex is the one llama.cpp uses too (qwen2, llama3, ...)
        names = [name for name, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == regex]
        if names:
            return names[0]
    raise InputError(f"GGUF export: llama.cpp has no pre-tokenizer matching this tokenizer's ({json.dumps(pre)})")


def _looks_special(token: str) -> bool:
    """Added tokens llama.cpp treats as control tokens though the tokenizer does not mark them special."""
    wrapped = any(token.startswith(a) and token.endswith(b) for a, b in (("<|", "|>"), ("<\uff5c", "\uff5c>"),
                                                                         ("<unused", ">")))
    return wrapped or token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")


def _add_vocab(writer, model_dir: Path, vocab_size: int) -> None:
    """The tokenizer entries convert_hf_to_gguf.py writes for a byte-level BPE vocabulary (_set_vocab_gpt2)."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    if not tokenizer.is_fast:
        raise InputError(f"{model_dir}: GGUF export needs a fast (tokenizer.json) tokenizer")
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # ids the embedding has and the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            # llama.cpp matches control and user-defined tokens as normalized text
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # user-defined tokens are matched with plain spaces
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True)  # merges, special ids, add_*_token, chat template
    if "bos" not in special.add_special_token and tokenizer.bos_token_id is not None:
        # Without the flag llama.cpp picks a default; write what the tokenizer does.
        ids = tokenizer("a")["input_ids"]
        special.add_special_token["bos"] = bool(ids) and ids[0] == tokenizer.bos_token_id
    special.add_to_gguf(writer, quiet=True)


def _add_hparams(writer, config, arch: str, quant: str) -> None:
    """The model's shape under llama.cpp's keys (TextModel, LlamaModel and Qwen2Model.set_gguf_parameters)."""
    import gguf

    theta, scaling = _rope(config)
    if scaling != "default":
        raise InputError(f"GGUF export: rope scaling {scaling!r} is not supported (only unscaled rotary embeddings)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:  # e.g. after head pruning (dstune prune)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
    writer.add_file_type(gguf.LlamaFileType[file_types[quant]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _state_dict(model_dir: Path):
    """(name, fp32 tensor) for each weight of a safetensors directory, one at a time."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise InputError(f"{model_dir}: GGUF export reads safetensors weights, and there are none")
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name).float()


def export_gguf(merged_dir: Path, out_dir: Path, quant: str) -> Path:
    """Write a merged HF directory as one GGUF file of type `quant` (f32, f16, q8_0, q4_0); return its path."""
    import gguf
    from transformers import AutoConfig

    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    if quant not in QUANTS:
        raise InputError(f"GGUF export writes {', '.join(QUANTS)}, not {quant!r}")
    config = AutoConfig.from_pretrained(merged_dir, trust_remote_code=False)
    arch = _architecture(config, merged_dir)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    name = merged_dir.parent.name if merged_dir.name == "merged" else merged_dir.name
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.{quant.upper()}.gguf"
    partial = path.with_name(path.name + ".partial")  # renamed when complete: no half-written artifact
    # A temporary file holds each tensor once written, so memory peaks at one tensor, not the model.
    writer = gguf.GGUFWriter(partial, arch, use_temp_file=True)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    _add_hparams(writer, config, arch, quant)
    _add_vocab(writer, merged_dir, config.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    for hf_name, tensor in _state_dict(merged_dir):
        if tied and hf_name == "lm_head.weight":  # llama.cpp reuses token_embd; no output tensor
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            raise InputError(f"{merged_dir}: no GGUF name for tensor {hf_name!r}")
        if (n_head := _llama_permutation(config, gguf_name)) is not None:
            tensor = permute_qk(tensor, n_head)
        data = tensor.numpy()
        qtype = tensor_type(gguf_name, data.shape, quant, tied)
        writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return partial.replace(path)


def load_gguf(artifact: Path, merged_dir: Path):
    """The model and tokenizer transformers reads from a GGUF file (dequantized to fp32, converted once)."""
    # The tokenizer too comes from the file, as llama.cpp would use it; `merged_dir` is not needed.
    path = resolve_model_path(str(artifact))
    return load_model(path), load_tokenizer(path)


def _lora_alpha(config: dict, where: Path) -> float:
    """The alpha llama.cpp needs to scale each module by peft's factor: llama.cpp uses alpha / rank."""
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        kind = "DoRA" if config.get("use_dora") else config.get("peft_type")
        raise InputError(f"{where}: llama.cpp applies LoRA adapters only, not {kind}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise InputError(f"{where}: per-module ranks or alphas have no GGUF form (llama.cpp has one alpha)")
    alpha, rank = float(config["lora_alpha"]), int(config["r"])
    # rsLoRA scales by alpha / sqrt(r); the same factor as alpha' / r
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def export_lora_adapter(adapter_dir: Path, out_path: Path, base_dir: Path | None = None) -> Path:
    """Write a peft LoRA adapter as a llama.cpp LoRA GGUF (`llama-cli -m base.gguf --lora out_path`)."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    peft_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    alpha = _lora_alpha(peft_config, adapter_dir)
    # only the base's config is read: its architecture, and head counts for the Q/K permutation
    base = resolve_model_path(str(base_dir or peft_config["base_model_name_or_path"]))
    config = AutoConfig.from_pretrained(base, trust_remote_code=False)
    arch = _architecture(config, base)
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out_path, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(adapter_dir.name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for key in sorted(weights):
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):  # a LoRA bias, a saved module: no GGUF form
            raise InputError(f"{adapter_dir}: {key!r} is not a LoRA A/B matrix, and a GGUF adapter holds only those")
        if key.endswith(".lora_B.weight"):
            continue
        hf_name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None or gguf_name.split(".")[-2] not in LORA_TARGETS:
            raise InputError(f"{adapter_dir}: LoRA on {hf_name!r} has no llama.cpp form "
                             f"(GGUF adapters cover {', '.join(LORA_TARGETS)})")
        lora_a, lora_b = weights[key].float(), weights[key.replace(".lora_A.", ".lora_B.")].float()
        # The base's Q/K rows are permuted; B's rows follow them, A (the input side) is untouched.
        if (n_head := _llama_permutation(config, gguf_name)) is not None:
            lora_b = permute_qk(lora_b, n_head)
        writer.add_tensor(f"{gguf_name}.lora_a", lora_a.numpy())  # ggml shape (in, r)
        writer.add_tensor(f"{gguf_name}.lora_b", lora_b.numpy())  # ggml shape (r, out)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


EXPORTS.register("gguf", ExportFormat(
    name="gguf", quants=QUANTS,
    description="one GGUF file for llama.cpp / Ollama (Llama, Qwen2); f32, f16, q8_0 or q4_0",
    export=export_gguf, load=load_gguf,
))
