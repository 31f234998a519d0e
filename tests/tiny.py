"""Tiny random model configs (Llama, Qwen2, DeepSeek-V3) that build in well under a second."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, tie_word_embeddings=False,
            # Wide enough init that a frozen LM head can still express a confident answer after the final norm.
            initializer_range=0.2)


def tiny_config(model_type: str, vocab_size: int):
    """A config of a tiny random model of the given architecture."""
    from transformers import DeepseekV3Config, LlamaConfig, Qwen2Config

    if model_type == "llama":
        return LlamaConfig(vocab_size=vocab_size, num_key_value_heads=2, **TINY)
    if model_type == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, num_key_value_heads=2, **TINY)
    if model_type == "deepseek_v3":
        return DeepseekV3Config(
            vocab_size=vocab_size, moe_intermediate_size=32, num_key_value_heads=4, n_shared_experts=1,
            n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
            q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, **TINY,
        )
    raise ValueError(model_type)


def make_tiny_model_dir(path: Path, model_type: str, tokenizer_dir: Path, seed: int = 0, **config) -> Path:
    """Save a tiny random model of `model_type` with the test tokenizer as an HF directory (config: overrides)."""
    import shutil

    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    settings = tiny_config(model_type, vocab_size=49152)
    for key, value in config.items():
        setattr(settings, key, value)
    model = AutoModelForCausalLM.from_config(settings)
    model.save_pretrained(path)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, path / item.name)
    return path
