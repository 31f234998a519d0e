"""Fixtures of the training tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cli_runner import shared_runner

# The plugin tests' schedule: 6 steps of 2 micro-batches, a checkpoint every 2 steps (resume from step 2 or 4).
TRAIN = {"max_steps": 6, "batch_size": 2, "grad_accum": 2, "save_steps": 2, "eval_steps": 0, "learning_rate": 1e-2,
         "logging_steps": 1, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dirs):
    root = tmp_path_factory.mktemp("plugins")
    words = ["red", "green", "blue", "cat", "dog", "sun"]
    train = root / "train.jsonl"
    # Lengths vary, so that a length-ordered curriculum is visible in the sample order.
    train.write_text("".join(json.dumps({"instruction": "say " + " ".join([words[i % 6]] * (1 + i % 4)),
                                         "output": words[i % 6]}) + "\n" for i in range(16)))

    def recipe(name: str, **train_section) -> Path:
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "name": name, "output_dir": str(root / "runs"), "model": {"name_or_path": str(tiny_model_dirs["llama"])},
            "data": {"source": "files", "train_file": str(train), "max_length": 64},
            "train": {**TRAIN, **train_section}, "eval": {"cache": False},
        }))
        return path

    return {"root": root, "recipe": recipe, "run": shared_runner()}
