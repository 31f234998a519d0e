"""Helpers for the serve tests: LoRA adapters with random weights, and a server on a free loopback port."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch


def make_lora(model_dir: Path, out: Path, seed: int, **config) -> Path:
    """A LoRA adapter with random (non-zero) A and B, so that each adapter answers differently."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    settings = dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, LoraConfig(**{**settings, **config}))
    peft_model.save_pretrained(out)
    return out


def start(recipe, adapters: dict, **options):
    """Build a server for `recipe` with `adapters` (name -> folder) and run it on a free 127.0.0.1 port."""
    from dstune.serve import BackgroundServer, ServeOptions, build_server, check_options

    opts = ServeOptions(adapters={k: str(v) for k, v in adapters.items()}, **options)
    check_options(opts)
    return BackgroundServer(build_server(recipe, opts))


def short_finishes_first(client, long_model: str, short_model: str) -> bool:
    """Stream a 256-token answer; once it has begun, ask for 4 tokens: whether the short answer ended first."""
    done: dict[str, float] = {}
    started = threading.Event()

    def long():
        stream = client.chat.completions.create(model=long_model, messages=[{"role": "user", "content": "write at length"}],
                                                max_tokens=256, temperature=0, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                started.set()
        done["long"] = time.perf_counter()

    thread = threading.Thread(target=long)
    thread.start()
    assert started.wait(60), "the long answer did not start"
    client.chat.completions.create(model=short_model, messages=[{"role": "user", "content": "short"}], max_tokens=4,
                                   temperature=0)
    done["short"] = time.perf_counter()
    thread.join(120)
    return done["short"] < done["long"]
