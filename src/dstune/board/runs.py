"""What the board reads of a run folder: its state, its curves, its reports and the figures to compare runs by."""

from __future__ import annotations

import json
import time
from pathlib import Path

# A run with no job of the board's whose log or events changed this recently is taken as running elsewhere (a CLI).
ACTIVE_SECONDS = 120
# The pages a run writes that the board shows (every other file of a run stays private).
REPORTS = {"report": "report.html", "data": "data/report.html", "curve": "curve/curve.html"}


def run_state(run_dir: Path, jobs: list[dict]) -> dict:
    """A run's state from its newest job (running, failed, ...) and its folder (done, stopped, incomplete)."""
    job = jobs[0] if jobs else None
    report = run_dir / "report.json"
    checkpoints = run_dir / "checkpoints"
    resumable = checkpoints.is_dir() and any(checkpoints.glob("checkpoint-*"))
    touched = max((p.stat().st_mtime for p in (run_dir / "events.jsonl", run_dir / "dstune.log") if p.is_file()),
                  default=0.0)
    if job and job["state"] == "running":
        state = "running"
    elif not job and time.time() - touched < ACTIVE_SECONDS and not (report.is_file()
                                                                    and report.stat().st_mtime >= touched):
        state = "running elsewhere"  # started from a terminal: the curves stream, Stop is the terminal's
    elif job and job["state"] in ("failed", "lost"):
        state = "failed" if job.get("rc") != 3 else "gate failed"
    elif report.is_file() and (not job or report.stat().st_mtime >= job["started"]):
        state = "done"
    elif resumable:
        state = "stopped"  # SIGTERM checkpointed it, or it was killed: `--resume` continues it
    else:
        state = "incomplete"
    return {"state": state, "error": job.get("error") if job and state in ("failed", "gate failed") else None,
            "resumable": resumable and state in ("stopped", "failed"), "job": job["id"] if job else None}


def run_recipe_source(run_dir: Path) -> Path | None:
    """The manifest that records the run's resolved recipe: the report, else the dataset's (`dstune run` reads
    either)."""
    for candidate in (run_dir / "report.json", run_dir / "data" / "manifest.json"):
        if candidate.is_file():
            return candidate
    return None


def read_report(run_dir: Path) -> dict | None:
    """The run's report.json, or None."""
    try:
        return json.loads((run_dir / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_curves(run_dir: Path, offset: int = 0) -> tuple[list[dict], int]:
    """The step and eval events written after byte `offset` of events.jsonl, and the offset to read on from.

    A line not yet ended (being written) is left for the next read.
    """
    path = run_dir / "events.jsonl"
    try:
        with path.open("rb") as handle:
            if path.stat().st_size < offset:  # the log was truncated (a resume): start again
                offset = 0
            handle.seek(offset)
            chunk = handle.read()
    except OSError:
        return [], offset
    end = chunk.rfind(b"\n") + 1
    events = []
    for line in chunk[:end].splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") in ("step", "eval", "stage"):
            events.append(event)
    return events, offset + end


def comparison(reports: dict[str, dict]) -> dict:
    """Runs side by side: each metric (base and tuned, with CIs), tier 1, training cost and exports with gates."""
    metrics = sorted({m for r in reports.values() for m in (r.get("metrics") or {})})
    rows = []
    for metric in metrics:
        cells = {}
        for name, report in reports.items():
            entry = (report.get("metrics") or {}).get(metric)
            cells[name] = None if entry is None else {
                "base": entry.get("base"), "base_ci": entry.get("base_ci"), "tuned": entry.get("tuned"),
                "tuned_ci": entry.get("tuned_ci"), "p_value": (entry.get("paired") or {}).get("p_value")}
        rows.append({"metric": metric, "cells": cells})
    training = {}
    for name, report in reports.items():
        train = report.get("training") or {}
        recipe = (report.get("provenance") or {}).get("recipe") or {}
        general = report.get("general") or {}
        training[name] = {
            "method": train.get("method") or (recipe.get("train") or {}).get("method"),
            "model": (recipe.get("model") or {}).get("name_or_path"),
            "trainable_parameters": train.get("trainable_parameters"),
            "trainable_percent": train.get("trainable_percent"),
            "optimizer_steps": train.get("optimizer_steps"), "train_seconds": train.get("train_seconds"),
            "retention": (general.get("retention") or {}).get("worst"),
            "exports": [{"spec": f"{e['format']}:{e['quant']}", "retention": e.get("retention"),
                         "size_ratio": e.get("size_ratio"), "passed": e.get("passed")}
                        for e in report.get("exports") or []],
        }
    return {"runs": list(reports), "metrics": rows, "training": training}
