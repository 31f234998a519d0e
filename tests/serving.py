"""Helpers for the serve tests: LoRA adapters with random weights, and a server on a free loopback port."""

from __future__ import annotations

import socket
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


class Running:
    """A server on a free loopback port, in a thread; `url` is its /v1 base."""

    def __init__(self, server, app):
        import uvicorn

        self.server = server
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.uvicorn = uvicorn.Server(uvicorn.Config(app, log_level="error", timeout_keep_alive=5))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)
        self.server.engine.close()


def start(recipe, adapters: dict, **options) -> Running:
    from dstune.serve import ServeOptions, build_server, check_options
    from dstune.serve.app import create_app

    opts = ServeOptions(adapters={k: str(v) for k, v in adapters.items()}, **options)
    check_options(opts)
    server = build_server(recipe, opts)
    return Running(server, create_app(server))
