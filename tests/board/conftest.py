"""Fixtures for the board: a folder with a tiny recipe, the board as a real process, and headless Chromium.

Chromium comes from the system packages (`make test` installs it). A missing browser fails these tests instead of
skipping them: a green run means the browser ran.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from boarding import CHROMIUM_ARGS, Board, chromium_path, write_tiny_recipe, write_toy_data


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium driven by Playwright (the system browser: nothing is downloaded)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    errors = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    yield tab
    context.close()
    assert not errors, f"script errors in the page: {errors}"


@pytest.fixture
def board_root(tmp_path, tiny_model_dirs, jsonl_dataset) -> Path:
    """A working folder with recipes/tiny.yaml (a tiny Llama, the toy task)."""
    root = tmp_path / "work"
    write_tiny_recipe(root, tiny_model_dirs["llama"], jsonl_dataset)
    return root


def _running(root: Path):
    started = Board(root).start()
    yield started
    started.stop()
    for job in started.jobs():  # every job it started is killed
        pid = job.get("keeper_pid")
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def board(board_root):
    """A running board of this test's own."""
    yield from _running(board_root)


@pytest.fixture(scope="module")
def shared_board(tmp_path_factory, tiny_model_dirs):
    """One running board for a module's tests that start no run (the form, the refusals)."""
    root = tmp_path_factory.mktemp("board") / "work"
    write_tiny_recipe(root, tiny_model_dirs["llama"], write_toy_data(root / "data"))
    yield from _running(root)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A browser test that skips (however: a skip mark, an importorskip) is reported as failed: CI stays red."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("browser") is not None:
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid}: a browser test skipped ({report.longrepr}); the board's tests never skip"
