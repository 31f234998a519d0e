"""`dstune board`: a local web UI to build recipes, launch and watch runs, read and compare reports, chat and export.

Pages are server-rendered by FastAPI (the stack of `dstune serve`) with one small script; runs, exports and chat
servers are `dstune` processes of their own (`jobs.py`), so they outlive the browser and the board. docs/board.md.
"""

from __future__ import annotations

import threading
from pathlib import Path

from ..errors import InputError
from .app import BoardOptions, create_app

__all__ = ["BoardOptions", "create_app", "board", "check_options"]


def check_options(options: BoardOptions) -> None:
    """Every error knowable from the command line, before the server starts."""
    if not 0 <= options.port <= 65535:
        raise InputError(f"--port {options.port}: not a port number")
    if len(options.token) < 8:
        raise InputError("--token: use at least 8 characters")


def _warm_up() -> None:
    """Import what the recipe preflight and the run page use (transformers, the registries): seconds, once."""
    import importlib

    for module in ("dstune.preflight", "dstune.models.loading", "dstune.data.templates", "dstune.data.augment",
                   "dstune.data.sources", "dstune.evaluate.checks", "dstune.export.formats",
                   "transformers.models.auto.configuration_auto"):
        importlib.import_module(module)


def board(options: BoardOptions) -> None:
    """Serve the board until interrupted; prints the URL with its token, as Jupyter does."""
    import uvicorn
    from fastapi.staticfiles import StaticFiles

    app = create_app(options)
    # The form's first check runs the CLI's preflight, which imports transformers: do it now, not on that click.
    threading.Thread(target=_warm_up, daemon=True).start()
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
    host = f"[{options.host}]" if ":" in options.host else options.host
    shown = "127.0.0.1" if options.host in ("0.0.0.0", "::") else host
    print(f"dstune: board on http://{shown}:{options.port}/?token={options.token}", flush=True)
    print(f"dstune: runs under {options.runs_path}; stop the board with Ctrl-C (runs it started go on)", flush=True)
    # Open event streams (a run page) would hold a graceful shutdown forever.
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning", timeout_graceful_shutdown=1)
