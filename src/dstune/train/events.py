"""The run's event log: `runs/<name>/events.jsonl`, one JSON line per logged step, evaluation, checkpoint and stage.

Each line is flushed as it is written, so a board can stream the curves of a run in progress and a killed run keeps
every line it wrote. The same scalars go to TensorBoard under the tags the HF Trainer used (`train/loss`,
`train/learning_rate`, `train/grad_norm`, `eval/<metric>`). Only the main process writes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

KINDS = ("stage", "step", "eval", "checkpoint")


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class EventLog:
    """Appends events to `path` (and scalars to TensorBoard); on resume, drops what came after the checkpoint."""

    def __init__(self, path: Path, enabled: bool = True, resume_step: int | None = None,
                 tensorboard_dir: Path | None = None):
        self.path = path
        self.enabled = enabled
        self._handle = None
        self._tb = None
        if not enabled:
            return
        from .checkpoint import truncate_log

        truncate_log(path, resume_step)
        self._handle = path.open("a")
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def write(self, kind: str, **fields) -> None:
        """Append one event (`kind`: stage, step, eval or checkpoint) with a wall-clock time."""
        if not self.enabled:
            return
        assert kind in KINDS, kind
        event = {"event": kind, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in fields.items()}}
        self._handle.write(json.dumps(event) + "\n")
        self._handle.flush()
        if self._tb is not None and kind in ("step", "eval") and "step" in fields:
            for key, value in fields.items():
                if key in ("step", "epoch") or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                tag = f"eval/{key.removeprefix('eval_')}" if kind == "eval" else f"train/{key}"
                self._tb.add_scalar(tag, value, fields["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_events(path: Path, kind: str | None = None) -> list[dict]:
    """The events of a run (of one kind), skipping a last line cut short by a kill."""
    events = []
    for line in Path(path).read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if kind is None or event["event"] == kind:
            events.append(event)
    return events
