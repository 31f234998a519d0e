"""The board driven through its real pages in headless Chromium: form, launch, live curve, report, chat, compare,
a closed browser, a restarted board, and a failing run."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from boarding import Board, screenshot
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

DONE = 120_000  # ms: a tiny run takes ~15 s; generous for a loaded CI machine


def points(tab, chart: str = "#chart-loss") -> int:
    line = tab.locator(f"{chart} polyline")
    return int(line.get_attribute("data-points") or 0) if line.count() else 0


def watch_until_done(tab) -> set[int]:
    """The loss curve's point counts seen while the run page says running, until it says done."""
    seen = set()
    deadline = time.monotonic() + DONE / 1000
    while time.monotonic() < deadline:
        state = tab.locator("#state").text_content()
        if state == "running":
            seen.add(points(tab))
        elif state in ("done", "failed", "gate failed"):
            break
        time.sleep(0.1)
    expect(tab.locator("#state")).to_have_text("done", timeout=5000)
    return seen


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


def test_form_launch_live_curve_report_chat_and_compare(board, page, board_root):
    launch_from_form(board, page, **{"train.max_steps": 150})
    seen = watch_until_done(page)
    run_dir = board_root / "runs" / "tiny"
    assert len(seen - {0}) >= 2, f"the curve did not grow while the run was live (point counts seen: {seen})"
    expect(page.locator("#chart-loss polyline")).to_have_attribute("data-points", str(step_events(run_dir)))
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

    # A second run, then both side by side.
    launch_from_form(board, page, name="tiny_fast", **{"train.learning_rate": 0.05})
    expect(page.locator("#state")).to_have_text("done", timeout=DONE)
    page.goto(f"{board.url}/runs")
    screenshot(page, "runs")
    page.check("input[name=run][value=tiny]")
    page.check("input[name=run][value=tiny_fast]")
    page.click("#compare")
    table = page.locator("#comparison")
    expect(table).to_contain_text("tiny_fast")
    expect(table).to_contain_text("exact_match")
    expect(table).to_contain_text("trainable parameters")
    expect(table).to_contain_text("gguf:f32: 1.000")
    screenshot(page, "compare")


def test_closing_the_browser_does_not_stop_the_run(board, browser, board_root, tmp_path):
    context = browser.new_context()
    tab = context.new_page()
    launch_from_form(board, tab, **{"train.max_steps": 120})
    expect(tab.locator("#chart-loss polyline")).to_be_attached(timeout=DONE)
    context.close()  # the browser goes away mid-training
    job = board.jobs()[0]
    rc = Path(board.root / "runs" / ".board" / "jobs" / job["id"] / "rc")
    deadline = time.monotonic() + DONE / 1000
    while not rc.is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert rc.read_text() == "0"
    # Same result as the run uninterrupted: the CLI, same recipe, another run folder.
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "dstune", "run", "recipes/tiny.yaml", "name=reference",
                    "train.max_steps=120"], cwd=board.root, check=True, capture_output=True)
    from safetensors.torch import load_file

    ours = load_file(board_root / "runs" / "tiny" / "adapter" / "adapter_model.safetensors")
    reference = load_file(board_root / "runs" / "reference" / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == reference.keys()
    assert all((ours[k] == reference[k]).all() for k in ours)


def test_a_restarted_board_still_lists_the_live_run(board, page, board_root):
    launch_from_form(board, page, **{"train.max_steps": 300})
    expect(page.locator("#state")).to_have_text("running", timeout=DONE)
    expect(page.locator("#chart-loss polyline")).to_be_attached(timeout=DONE)
    board.stop()  # the board goes; the run does not
    assert board.jobs()[0]["pid"]
    again = Board(board_root, port=board.port).start()
    try:
        again.login(page, "/runs")
        expect(page.locator("tr[data-run=tiny] .state")).to_have_text("running")
        page.goto(f"{again.url}/runs/tiny")
        expect(page.locator("#chart-loss polyline")).to_be_attached(timeout=30_000)
        first = points(page)
        screenshot(page, "run_live")
        seen = watch_until_done(page)
        assert max(seen | {0}) > first or points(page) > first, "the restarted board's curve did not grow"
        assert points(page) == step_events(board_root / "runs" / "tiny") == 300
    finally:
        again.stop()


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
