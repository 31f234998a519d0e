"""The board driven through its real pages in headless Chromium: form, launch, live curve, a closed browser, report,
chat, export and compare; a restarted board that stops and resumes the run; a failing run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from boarding import Board, screenshot
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

DONE = 120_000  # ms: a tiny run takes ~15 s; generous for a loaded CI machine


def points(tab, chart: str = "#chart-loss") -> int:
    line = tab.locator(f"{chart} polyline")
    return int(line.get_attribute("data-points") or 0) if line.count() else 0


def step_events(run_dir: Path) -> int:
    return sum(1 for line in (run_dir / "events.jsonl").read_text().splitlines() if '"event": "step"' in line)


def launch_from_form(board, tab, **values) -> None:
    board.login(tab, "/recipe")
    for key, value in values.items():
        tab.fill(f"[name='{key}']", str(value))
    expect(tab.locator("#check")).to_have_class(re.compile(r"\bok\b"))
    for key, value in values.items():
        expect(tab.locator("#cli")).to_contain_text(f"{key}={value}")
    tab.click("#launch")
    tab.wait_for_url(re.compile(r"/runs/[\w.-]+$"))


def test_form_launch_live_curve_disconnect_report_chat_export_and_compare(board, browser, page, board_root):
    # The browser that launches the run watches its curve grow, then goes away mid-training.
    first = browser.new_context()
    tab = first.new_page()
    launch_from_form(board, tab, **{"train.max_steps": 150})
    seen = set()
    deadline = time.monotonic() + DONE / 1000
    while len(seen - {0}) < 2 and time.monotonic() < deadline:
        if tab.locator("#state").text_content() == "running":
            seen.add(points(tab))
        time.sleep(0.05)
    assert len(seen - {0}) >= 2, f"the curve did not grow while the run was live (point counts seen: {seen})"
    job = board.jobs()[0]
    rc = board.root / "runs" / ".board" / "jobs" / job["id"] / "rc"
    assert not rc.exists(), "the run ended before the browser closed: nothing was tested"
    first.close()

    # The same recipe from the CLI, for the result the run must reach without a browser.
    reference_log = (board.root / "reference.log").open("w")
    reference = subprocess.Popen([sys.executable, "-m", "dstune", "run", "recipes/tiny.yaml", "name=reference",
                                  "train.max_steps=150"], cwd=board.root, stdout=reference_log,
                                 stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not rc.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rc.read_text() == "0"

    run_dir = board_root / "runs" / "tiny"
    board.login(page, "/runs/tiny")
    expect(page.locator("#state")).to_have_text("done")
    expect(page.locator("#chart-loss polyline")).to_have_attribute("data-points", "150")
    assert step_events(run_dir) == 150
    recipe = json.loads((run_dir / "report.json").read_text())["provenance"]["recipe"]
    assert recipe["train"]["max_steps"] == 150
    # An export, gated; it runs while the chat below does.
    page.select_option("#export-spec", "gguf:f32")
    page.click("#export")
    expect(page.locator("#exports tr[data-spec='gguf:f32']")).to_be_attached()

    page.click("#report-link")
    for which in ("report", "data"):
        expect(page.frame_locator(f"#report-{which}").locator("img").first).to_be_visible()
    screenshot(page, "report")

    # Chat: the board's `dstune serve` answers with the base model and the run's adapter, side by side.
    page.goto(f"{board.url}/chat?run=tiny")
    page.click("#serve-start")
    expect(page.locator("#serve-state")).to_have_text("ready", timeout=DONE)
    page.fill("#prompt", "colour of item 3")
    page.click("#send")
    expect(page.locator(".answer")).to_have_count(2, timeout=60_000)
    answers = {box.get_attribute("data-model"): box.locator("pre").text_content()
               for box in page.locator(".answer").all()}
    assert set(answers) == {"base", "tiny"}
    from dstune import api
    from dstune.config import load_recipe

    tuned = api.chat_session(load_recipe(board_root / "recipes" / "tiny.yaml"), None, None, str(run_dir / "adapter"), 64)
    assert answers["tiny"] == tuned("colour of item 3"), "the adapter's answer is not what `dstune chat` gives"
    screenshot(page, "chat")
    page.click("#serve-stop")
    expect(page.locator("#serve-state")).to_have_text(re.compile("stopped|done|failed"), timeout=30_000)

    page.goto(f"{board.url}/runs/tiny")
    row = page.locator("#exports tr[data-spec='gguf:f32']")
    expect(row).to_have_attribute("data-state", "done", timeout=DONE)
    expect(row.locator(".gate")).to_have_text("passed")
    record = json.loads((run_dir / "report.json").read_text())["exports"][0]
    assert (record["format"], record["quant"], record["passed"]) == ("gguf", "f32", True)
    screenshot(page, "run_done")

    # The run the browser left is the run the CLI makes: the same adapter, bit for bit.
    assert reference.wait(DONE / 1000) == 0, (board.root / "reference.log").read_text()[-2000:]
    reference_log.close()
    from safetensors.torch import load_file

    ours = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    cli = load_file(board_root / "runs" / "reference" / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == cli.keys() and all(torch.equal(ours[k], cli[k]) for k in ours)

    # Both side by side.
    page.goto(f"{board.url}/runs")
    screenshot(page, "runs")
    page.check("input[name=run][value=tiny]")
    page.check("input[name=run][value=reference]")
    page.click("#compare")
    table = page.locator("#comparison")
    expect(table).to_contain_text("reference")
    expect(table).to_contain_text("exact_match")
    expect(table).to_contain_text("trainable parameters")
    expect(table).to_contain_text("gguf:f32: 1.000")
    screenshot(page, "compare")


def test_a_restarted_board_still_lists_the_live_run_and_can_stop_and_resume_it(board, page, board_root):
    launch_from_form(board, page, **{"train.max_steps": 300, "train.save_steps": 20})
    expect(page.locator("#state")).to_have_text("running", timeout=DONE)
    expect(page.locator("#chart-loss polyline")).to_be_attached(timeout=DONE)
    board.stop()  # the board goes; the run does not
    assert board.jobs()[0]["pid"]
    again = Board(board_root, port=board.port).start()
    run_dir = board_root / "runs" / "tiny"
    try:
        again.login(page, "/runs")
        expect(page.locator("tr[data-run=tiny] .state")).to_have_text("running")
        page.goto(f"{again.url}/runs/tiny")
        expect(page.locator("#chart-loss polyline")).to_be_attached(timeout=30_000)
        first = points(page)
        deadline = time.monotonic() + DONE / 1000
        while points(page) <= first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert points(page) > first, "the restarted board's curve did not grow"
        screenshot(page, "run_live")

        # The new board stops the run the old one started (SIGTERM: it checkpoints), and resumes it.
        page.click("#stop")
        expect(page.locator("#state")).to_have_text("stopped", timeout=DONE)
        assert not (run_dir / "report.json").exists() and any((run_dir / "checkpoints").glob("checkpoint-*"))
        assert 0 < step_events(run_dir) < 300
        page.click("#resume")
        expect(page.locator("#state")).to_have_text("done", timeout=DONE)
        expect(page.locator("#command")).to_contain_text("--resume")
        expect(page.locator("#chart-loss polyline")).to_have_attribute("data-points", "300")
    finally:
        again.stop()
    steps = [json.loads(line)["step"] for line in (run_dir / "events.jsonl").read_text().splitlines()
             if '"event": "step"' in line]
    assert steps == list(range(1, 301))  # the log kept up to the checkpoint, then the rest: every step once
    assert json.loads((run_dir / "report.json").read_text())["training"]["optimizer_steps"] == 300


def test_a_failing_run_shows_its_one_line_error(board, page, board_root):
    bad = board_root / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": oops\n')
    board.login(page, "/recipe")
    page.fill("[name='data.train_file']", str(bad))
    page.locator("details:has([name='data.quality.strict']) summary").click()
    page.select_option("[name='data.quality.strict']", "true")
    expect(page.locator("#check")).to_have_class(re.compile(r"\bok\b"))
    page.click("#launch")
    page.wait_for_url(re.compile("/runs/tiny$"))
    expect(page.locator("#state")).to_have_text("failed", timeout=DONE)
    error = page.locator("#error").text_content()
    assert f"{bad}:2" in error and "Traceback" not in error and "\n" not in error.strip()
    screenshot(page, "run_failed")

