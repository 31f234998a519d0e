"""The board's speed: page load times, and the delay from a step the run logs to that step on the live curve.

    .venv/bin/python bench/board.py            # 600 logged steps, 5 repetitions of each page load
    .venv/bin/python bench/board.py --quick    # 300 steps, 3 repetitions (about a minute)
    .venv/bin/python bench/board.py --smoke    # 40 steps, 1 repetition

The baseline is what a user would otherwise open to watch a run: TensorBoard on the run's own `tb/` folder (dstune
writes it), with its default settings, in the same Chromium, during the same run. Its delay is measured where it is
smallest, at its HTTP data API (`/data/plugin/scalars/scalars`): its page only asks that API every 30 s by default,
so its on-screen delay is larger still. The board's delay is measured on the page itself: the step number the page
shows, read every ~10 ms. A step's delay is the time the page (or the API) first showed it, or a later step, minus
the `time` the run wrote on its events.jsonl line. The model is a tiny random Llama for every mode: what is
measured is the board, not the training. Writes bench/results/board.json (--smoke: a temporary folder) and prints
the table of docs/board.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, smoke_data, smoke_dir, smoke_model  # noqa: E402

TOKEN = "bench-board-token-000"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGES = ["/recipe", "/runs", "/runs/bench", "/report/bench", "/compare?run=bench", "/chat?run=bench"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_port(port: int, process: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:4]} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {seconds} s")


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"X-Board-Token": TOKEN, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def load_ms(tab, url: str) -> float:
    """The page's load event, in ms from the start of its navigation (the browser's own Navigation Timing)."""
    tab.goto(url, wait_until="load")
    return tab.evaluate("() => performance.getEntriesByType('navigation')[0].loadEventEnd")


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"n": len(values), "median": round(statistics.median(ordered), 1) if ordered else None,
            "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1) if ordered else None,
            "max": round(ordered[-1], 1) if ordered else None}


def delays(events: list[dict], seen: list[tuple[float, int]]) -> list[float]:
    """Per logged step: ms from its events.jsonl time to the first observation showing it (or a later step)."""
    out = []
    for event in events:
        shown = next((t for t, step in seen if step >= event["step"]), None)
        if shown is not None:
            out.append(1000 * (shown - event["time"]))
    return out


def watch_tensorboard(port: int, stop: threading.Event, seen: list[tuple[float, int]]) -> None:
    """Poll TensorBoard's scalar API for train/loss every 10 ms: (time, newest step) whenever it grows."""
    newest = 0
    while not stop.is_set():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=.&tag=train/loss",
                                        timeout=5) as response:
                points = json.loads(response.read())
            step = max((p[1] for p in points), default=0)
        except (OSError, ValueError):
            step = 0
        if step > newest:
            newest = step
            seen.append((time.time(), step))
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="40 steps, 1 repetition (seconds)")
    parser.add_argument("--quick", action="store_true", help="300 steps, 3 repetitions")
    parser.add_argument("--model", help="a tiny model folder built already")
    parser.add_argument("--out", help="results file (default bench/results/board.json; --smoke: a temporary folder)")
    args = parser.parse_args()
    steps, reps = (40, 1) if args.smoke else (300, 3) if args.quick else (600, 5)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("bench/board.py: no Chromium on PATH (apt-get install chromium)")

    work = smoke_dir("board")
    model = smoke_model(work, args.model)
    data = smoke_data(work / "data")
    (work / "recipes").mkdir()
    overrides = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in data}
    recipe = {"name": "bench", "model": {"name_or_path": str(model)},
              "data": {"source": "files", "train_file": overrides["data.train_file"],
                       "dev_file": overrides["data.dev_file"], "test_file": overrides["data.test_file"],
                       "max_length": 64},
              "train": {"learning_rate": 1e-2, "max_steps": steps, "batch_size": 4, "eval_steps": 0,
                        "logging_steps": 1, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
              "eval": {"batch_size": 8, "max_new_tokens": 4, "cache": False}}
    (work / "recipes" / "bench.yaml").write_text(json.dumps(recipe))

    env = {**os.environ, "DSTUNE_BOARD_TOKEN": TOKEN, "PYTHONPATH": str(ROOT / "src")}
    port, tb_port = free_port(), free_port()
    board = subprocess.Popen([sys.executable, "-m", "dstune", "board", "--port", str(port)], cwd=work, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tensorboard = None
    from playwright.sync_api import sync_playwright

    try:
        wait_port(port, board)
        url = f"http://127.0.0.1:{port}"
        with sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            tab = browser.new_page()
            tab.goto(f"{url}/runs?token={TOKEN}")
            launched = post(f"{url}/api/runs/launch", {"base": "recipes/bench.yaml", "values": {}})
            tab.goto(f"{url}/runs/bench")
            run_dir = work / "runs" / "bench"
            # TensorBoard starts on the run's tb/ folder as soon as the run has made it (a user's order, too).
            while not (run_dir / "tb").is_dir():
                time.sleep(0.05)
            tensorboard = subprocess.Popen(
                [sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir / "tb"), "--port", str(tb_port),
                 "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stop = threading.Event()
            tb_seen: list[tuple[float, int]] = []
            watcher = threading.Thread(target=watch_tensorboard, args=(tb_port, stop, tb_seen), daemon=True)
            watcher.start()
            board_seen: list[tuple[float, int]] = []
            newest = 0
            rc = run_dir.parent / ".board" / "jobs" / launched["job"] / "rc"
            while not rc.is_file():
                shown = tab.locator("#last-step").get_attribute("data-step")
                if shown and int(shown) > newest:
                    newest = int(shown)
                    board_seen.append((time.time(), newest))
                time.sleep(0.01)
            deadline = time.monotonic() + 15  # TensorBoard reloads every 5 s: let it catch up
            while (not tb_seen or tb_seen[-1][1] < steps) and time.monotonic() < deadline:
                time.sleep(0.1)
            stop.set()
            watcher.join()
            assert rc.read_text() == "0", (run_dir.parent / ".board" / "jobs" / launched["job"] / "output.log").read_text()
            events = [e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines())
                      if e["event"] == "step"]

            loads: dict[str, list[float]] = {p: [] for p in PAGES}
            tb_loads: list[float] = []
            wait_port(tb_port, tensorboard)
            for _ in range(reps):  # A B A B: each board page, then TensorBoard's page
                for path in PAGES:
                    loads[path].append(load_ms(tab, f"{url}{path}"))
                tb_loads.append(load_ms(tab, f"http://127.0.0.1:{tb_port}/"))
            browser.close()
    finally:
        for process in (board, tensorboard):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(20)

    board_delay = summary(delays(events, board_seen))
    tb_delay = summary(delays(events, tb_seen))
    page_loads = {p: {"runs_ms": [round(v, 1) for v in values], **summary(values)} for p, values in loads.items()}
    run_page = page_loads["/runs/bench"]["median"]
    tb_page = summary(tb_loads)["median"]
    result = {
        "benchmark": "board", "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "machine": machine(),
        "settings": {"logged_steps": steps, "repetitions": reps, "model": "tiny random Llama (2 layers, hidden 64)",
                     "board_event_poll_s": 0.25, "page_observed_every_ms": 10,
                     "baseline": "TensorBoard (default settings: 5 s reload) on the run's tb/ folder, its data API "
                                 "polled every 10 ms; its page reloads data every 30 s by default"},
        "page_load_ms": page_loads, "tensorboard_page_load_ms": {"runs_ms": [round(v, 1) for v in tb_loads],
                                                                **summary(tb_loads)},
        "curve_delay_ms": {"board_page": board_delay, "tensorboard_api": tb_delay},
        "ratios": {"run_page_load_over_tensorboard": round(run_page / tb_page, 3) if tb_page else None,
                   "curve_delay_board_over_tensorboard": round(board_delay["median"] / tb_delay["median"], 3)
                   if board_delay["median"] and tb_delay["median"] else None},
    }
    out = Path(args.out) if args.out else (work if args.smoke else ROOT / "bench" / "results") / "board.json"
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"\nwritten to {out}")


def table(result: dict) -> str:
    rows = ["| page | load, median ms [p95] |", "|---|---|"]
    for path, stats in result["page_load_ms"].items():
        rows.append(f"| board `{path}` | {stats['median']} [{stats['p95']}] |")
    tb = result["tensorboard_page_load_ms"]
    rows.append(f"| TensorBoard `/` (baseline) | {tb['median']} [{tb['p95']}] |")
    rows += ["", "| from a logged step to | delay, median ms | p95 | max | steps |", "|---|---|---|---|---|"]
    for label, key in (("the board's curve (on the page)", "board_page"),
                       ("TensorBoard's data API (baseline)", "tensorboard_api")):
        d = result["curve_delay_ms"][key]
        rows.append(f"| {label} | {d['median']} | {d['p95']} | {d['max']} | {d['n']} |")
    ratios = result["ratios"]
    rows.append(f"\nratios: run page load / TensorBoard page load {ratios['run_page_load_over_tensorboard']}; "
                f"curve delay board / TensorBoard {ratios['curve_delay_board_over_tensorboard']}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
