"""A tiny Llama served on 127.0.0.1 with two LoRA adapters, for tests that talk to it as a client would."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving import make_lora, start


@pytest.fixture(scope="package")
def adapters(tmp_path_factory, tiny_model_dirs) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-adapters")
    return {name: make_lora(tiny_model_dirs["llama"], root / name, seed) for name, seed in (("alpha", 1), ("beta", 2))}


@pytest.fixture(scope="package")
def serve_recipe(tmp_path_factory, tiny_model_dirs):
    from dstune.config import load_recipe

    out = tmp_path_factory.mktemp("serve-runs")
    return load_recipe({"name": "serve", "output_dir": str(out), "model": {"name_or_path": str(tiny_model_dirs["llama"])},
                        "data": {"source": "files", "train_file": __file__, "system_prompt": "You code diagnoses."}})


@pytest.fixture(scope="package")
def served(serve_recipe, adapters):
    running = start(serve_recipe, adapters, api_key="sk-test", admin_key="admin-test", max_queue=128)
    yield running
    running.stop()
