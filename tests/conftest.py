"""Fixtures: tiny random Llama / Qwen2 / DeepSeek-V3 models built from configs, with the SmolLM2 tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs pytest-xdist workers: each gets its share of the cores, and so does every process it starts
# (CLI runs, torchrun ranks, servers), so that two workers never oversubscribe the machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
torch.set_num_threads(THREADS)

from tiny import make_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer (ChatML template), read once from the embedded GGUF."""
    from transformers import AutoTokenizer

    from dstune.models.loading import embedded_gguf_path

    gguf = embedded_gguf_path("smollm2-135m-instruct")
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from dstune.models.loading import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Tiny random Llama, Qwen2 and DeepSeek-V3 directories, built once per session."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {t: make_tiny_model_dir(root / t, t, tokenizer_dir) for t in ("llama", "qwen2", "deepseek_v3")}


@pytest.fixture
def jsonl_dataset(tmp_path) -> dict[str, Path]:
    """Train/dev/test JSONL files of a toy task in the three record forms."""
    pairs = [(f"colour of item {i}", ["red", "green", "blue"][i % 3]) for i in range(24)]
    train = tmp_path / "train.jsonl"
    with train.open("w") as handle:
        for i, (q, a) in enumerate(pairs[:16]):
            if i % 3 == 0:
                record = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            elif i % 3 == 1:
                record = {"instruction": q, "output": a}
            else:
                record = {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            handle.write(json.dumps(record) + "\n")
    files = {"train": train}
    for split, chunk in (("dev", pairs[16:20]), ("test", pairs[20:])):
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in chunk))
    return files


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dirs, jsonl_dataset):
    """A recipe dict that trains a tiny Llama on the toy JSONL task in a few steps."""

    def make(model_type: str = "llama", name: str = "tiny", **sections) -> dict:
        recipe = {
            "name": name,
            "output_dir": str(tmp_path / "runs"),
            "model": {"name_or_path": str(tiny_model_dirs[model_type])},
            "data": {"source": "files", "train_file": str(jsonl_dataset["train"]),
                     "dev_file": str(jsonl_dataset["dev"]), "test_file": str(jsonl_dataset["test"]),
                     "max_length": 64},
            "train": {"learning_rate": 1e-2, "max_steps": 4, "batch_size": 4, "eval_steps": 0, "logging_steps": 1,
                      "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
            # Generation-cache hits would hide what a test measures; tests/evaluate/test_cache.py turns it on.
            "eval": {"batch_size": 4, "max_new_tokens": 4, "cache": False},
        }
        for key, value in sections.items():
            recipe[key] = {**recipe.get(key, {}), **value}
        return recipe

    return make
