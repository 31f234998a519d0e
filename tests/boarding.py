"""Helpers for the board tests: the board as a real process, screenshots, a tiny recipe in a working folder."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

TOKEN = "board-test-token-0123"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no Chromium on PATH: `make test` installs Debian's chromium (apt-get install chromium); the board's "
                "browser tests never skip")


def screenshot(tab, name: str, full_page: bool = True) -> None:
    """A screenshot into $DSTUNE_BOARD_SCREENSHOTS (docs/board/ when the docs are remade)."""
    folder = os.environ.get("DSTUNE_BOARD_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=full_page)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Board:
    """`dstune board` as a process of its own, in `root`, on a free port."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = root
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> Board:
        self.root.mkdir(parents=True, exist_ok=True)
        log = self.root / f"board-{self.port}.log"
        with log.open("a") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dstune", "board", "--port", str(self.port)], cwd=self.root,
                # One thread per job: a run, an export and a server side by side on 2 cores, not 6 spinning threads.
                env={**os.environ, "DSTUNE_BOARD_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}, stdout=out,
                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError("the board did not start in 60 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)

    def login(self, tab, path: str = "/runs") -> None:
        tab.goto(f"{self.url}{path}?token={TOKEN}")

    def jobs(self) -> list[dict]:
        folder = self.root / "runs" / ".board" / "jobs"
        return [json.loads((p / "job.json").read_text()) for p in sorted(folder.glob("*"))] if folder.is_dir() else []


def write_tiny_recipe(root: Path, model_dir: Path, data: dict, name: str = "tiny", **train) -> Path:
    recipe = {
        "name": name,
        "model": {"name_or_path": str(model_dir)},
        "data": {"source": "files", "train_file": str(data["train"]), "dev_file": str(data["dev"]),
                 "test_file": str(data["test"]), "max_length": 64},
        "train": {"learning_rate": 1e-2, "max_steps": 60, "batch_size": 4, "eval_steps": 0, "logging_steps": 1,
                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, **train},
        "eval": {"batch_size": 4, "max_new_tokens": 4, "cache": False},
    }
    path = root / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def write_toy_data(folder: Path) -> dict[str, Path]:
    """Train/dev/test JSONL of a toy colour task (16/4/4 records)."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [(f"colour of item {i}", ["red", "green", "blue"][i % 3]) for i in range(24)]
    files = {}
    for split, chunk in (("train", pairs[:16]), ("dev", pairs[16:20]), ("test", pairs[20:])):
        files[split] = folder / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in chunk))
    return files
