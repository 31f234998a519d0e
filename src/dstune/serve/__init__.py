"""`dstune serve`: an OpenAI-compatible server holding the base model once, with adapters chosen per request."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError


@dataclass
class ServeOptions:
    """The command line of `dstune serve`, checked by `check_options` before any model loads."""

    adapters: dict[str, str]
    model: str | None = None
    engine: str = "torch"  # torch | onnx (vllm is launched by api.serve, not built here)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    admin_key: str | None = None
    served_model_name: str | None = None
    max_batch: int = 32
    max_queue: int = 64
    max_tokens_cap: int = 1024
    max_model_len: int | None = None
    max_body_bytes: int = 1 << 20
    request_timeout: float = 300.0


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """`NAME=PATH` pairs (a bare PATH is named after its folder); names must be unique."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not name or not path:
            raise InputError(f"--adapter {spec!r}: expected NAME=PATH")
        if name in adapters:
            raise InputError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = path
    return adapters


def check_options(options: ServeOptions) -> None:
    """Every error knowable from the command line, before the model loads."""
    from .adapters import check_servable

    for name, value in (("--max-batch", options.max_batch), ("--max-queue", options.max_queue),
                        ("--max-tokens-cap", options.max_tokens_cap), ("--max-body-bytes", options.max_body_bytes)):
        if value < 1:
            raise InputError(f"{name} must be at least 1 (got {value})")
    if not 0 <= options.port <= 65535:
        raise InputError(f"--port {options.port}: not a port number")
    if options.request_timeout <= 0:
        raise InputError(f"--request-timeout must be positive (got {options.request_timeout})")
    if options.engine == "onnx":
        from .onnx_backend import check_export

        if not options.model:
            raise InputError("--engine onnx: --model names the ONNX export folder to serve (dstune export --format onnx "
                             "writes runs/<name>/exports/onnx-<quant>)")
        check_export(options.model, "--model")
        for name, path in options.adapters.items():
            check_export(path, f"--adapter {name}=")
        return
    for name, path in options.adapters.items():
        check_servable(name, path)


def build_server(recipe, options: ServeOptions):
    """Load the model once with every adapter (torch), or each export (onnx), start the engine; returns the
    `app.Server` (its `.engine` runs)."""
    from ..api import load
    from ..data.templates import get_template
    from ..evaluate.generate import stop_token_ids
    from .app import Server, ServeSettings
    from .engine import Engine
    from .metrics import ServeMetrics
    from .torch_backend import TorchBackend

    if options.engine == "onnx":
        from ..models.loading import load_tokenizer
        from .onnx_backend import OnnxBackend

        backend = OnnxBackend(options.model)
        tokenizer = load_tokenizer(Path(options.model), recipe.model.trust_remote_code)
        context = backend.base.context_length
    else:
        model, tokenizer = load(recipe, options.model)
        backend = TorchBackend(model)
        context = getattr(model.config, "max_position_embeddings", None) or 2048
    template = get_template(recipe.model.template, tokenizer)
    metrics = ServeMetrics()
    engine = Engine(backend, tokenizer, stop_token_ids(tokenizer, template), options.max_batch, options.max_queue,
                    metrics)
    try:
        for name, path in options.adapters.items():
            engine.call(lambda name=name, path=path: engine.load_adapter(name, path)).result()
    except BaseException:
        engine.close()
        raise
    metrics.bind(engine)
    if options.max_model_len:
        context = min(context, options.max_model_len)
    settings = ServeSettings(
        base_name=options.served_model_name or str(options.model or recipe.model.name_or_path),
        api_key=options.api_key, admin_key=options.admin_key, system_prompt=recipe.data.system_prompt,
        context_length=context, max_tokens_cap=options.max_tokens_cap, max_body_bytes=options.max_body_bytes,
        request_timeout_s=options.request_timeout, reasoning=template.name == "deepseek-r1")
    return Server(engine, tokenizer, template, settings, metrics)


def serve(recipe, options: ServeOptions) -> None:
    """Run the server until interrupted (uvicorn on options.host:options.port); api.serve has checked `options`."""
    import uvicorn

    from .app import create_app

    generated = not options.api_key
    if generated:  # every route but /health checks a key: without one given, the server makes one
        options.api_key = f"sk-dstune-{secrets.token_urlsafe(24)}"
    server = build_server(recipe, options)
    names = ", ".join([server.settings.base_name, *server.engine.adapters])
    print(f"dstune serve: http://{options.host}:{options.port}/v1 serving {names}", flush=True)
    if generated:
        print(f"dstune serve: API key {options.api_key} (made for this run; set DSTUNE_API_KEY or --api-key to "
              "choose one)", flush=True)
    try:
        uvicorn.run(create_app(server), host=options.host, port=options.port, log_level="warning")
    finally:
        server.engine.close()


class BackgroundServer:
    """A built server listening on a free 127.0.0.1 port in a thread (tests and bench/serve.py); `stop()` ends it."""

    def __init__(self, server):
        import uvicorn

        from .app import create_app

        self.server = server
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.uvicorn = uvicorn.Server(uvicorn.Config(create_app(server), log_level="error", timeout_keep_alive=5))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)
        self.server.engine.close()


def env_key(given: str | None, name: str) -> str | None:
    return given or os.environ.get(name) or None
