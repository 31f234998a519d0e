"""The board's jobs: `dstune` commands (run, export, serve) as processes of their own, which outlive the board.

Each job is a folder `<runs>/.board/jobs/<id>/` with `job.json` (the command, the run, the pids), `output.log`
(everything the command printed) and, when it has ended, `rc` (its exit code). The board starts a small keeper,
`python -m dstune.board.jobs FOLDER`, in a session of its own: the keeper starts the command, passes SIGTERM on to
it (dstune's runs checkpoint on SIGTERM), and writes `rc` when it ends. Closing the browser or restarting the board
touches none of this: a restarted board reads the folders back and finds the live ones by their pids.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

ERROR_PREFIX = "dstune: error: "


class Jobs:
    """The job folders under `root`, and the keepers this board process started (reaped as they end)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._keepers: dict[str, subprocess.Popen] = {}

    def start(self, kind: str, run: str, run_dir: Path, argv: list[str], cwd: Path, **extra) -> dict:
        """Start `python -m dstune ARGV` as a detached job of `kind` (run, export, serve) for the run `run`."""
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{secrets.token_hex(3)}"
        folder = self.root / job_id
        folder.mkdir(parents=True)
        job = {"id": job_id, "kind": kind, "run": run, "run_dir": str(run_dir), "argv": argv, "cwd": str(cwd),
               "started": time.time(), **extra}
        _write_json(folder / "job.json", job)
        self._keepers[job_id] = subprocess.Popen(
            [sys.executable, "-m", "dstune.board.jobs", str(folder)], cwd=cwd, start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self.get(job_id)

    def get(self, job_id: str) -> dict | None:
        """The job with its state: running, done (rc 0), failed (with its one-line error), or lost."""
        folder = self.root / job_id
        try:
            job = json.loads((folder / "job.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        keeper = self._keepers.get(job_id)
        if keeper is not None and keeper.poll() is not None:
            del self._keepers[job_id]  # reaped: no zombie left behind
        rc_file = folder / "rc"
        if rc_file.is_file():
            job["rc"] = int(rc_file.read_text().strip() or 1)
            job["state"] = "done" if job["rc"] == 0 else "failed"
        elif _alive(job.get("keeper_pid"), folder) or (keeper is not None and keeper.returncode is None
                                                         and "keeper_pid" not in job):
            job["state"] = "running"
        else:
            job["state"] = "lost"  # the keeper was killed (SIGKILL, a reboot): the command's fate is unknown
        job["error"] = error_line(folder / "output.log") if job["state"] in ("failed", "lost") else None
        return job

    def all(self) -> list[dict]:
        """Every job, newest first."""
        found = [self.get(p.name) for p in self.root.iterdir() if (p / "job.json").is_file()]
        return sorted((job for job in found if job is not None), key=lambda job: job["started"], reverse=True)

    def log(self, job_id: str, tail: int = 40) -> str:
        """The last `tail` lines the job printed (progress-bar redraws folded to their last state)."""
        return "\n".join(tail_lines(self.root / job_id / "output.log")[-tail:])

    def stop(self, job_id: str) -> bool:
        """SIGTERM to the job's command (a run checkpoints and exits); False when it is not running."""
        job = self.get(job_id)
        if not job or job["state"] != "running" or not job.get("pid"):
            return False
        try:
            os.kill(job["pid"], signal.SIGTERM)
        except ProcessLookupError:
            return False
        return True


def tail_lines(log: Path, size: int = 65536) -> list[str]:
    """The lines of the last `size` bytes of a log, each progress-bar redraw (\\r) folded to its last state."""
    try:
        with log.open("rb") as handle:
            handle.seek(max(0, log.stat().st_size - size))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]


def error_line(log: Path) -> str | None:
    """The command's one-line error (`dstune: error: ...`), or its last line when it died another way.

    Both are at the end: the tail is read, not the whole log of a long run, on every look at a failed job.
    """
    lines = [line.strip() for line in tail_lines(log)]
    for line in reversed(lines):
        if line.startswith(ERROR_PREFIX):
            return line.removeprefix(ERROR_PREFIX)
    lines = [line for line in lines if line]
    return lines[-1][:300] if lines else None


def _alive(pid: int | None, folder: Path) -> bool:
    """Whether `pid` is still this folder's keeper (a pid reused by another process is not)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z" and str(folder).encode() in cmdline


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.touch(mode=0o600)  # a serve job's API key is in it
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def keep(folder: Path) -> int:
    """The keeper: run the job's command with its output to output.log, pass SIGTERM on, write rc at the end."""
    job = json.loads((folder / "job.json").read_text())
    with (folder / "output.log").open("ab") as log:
        child = subprocess.Popen([sys.executable, "-m", "dstune", *job["argv"]], cwd=job["cwd"],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1", **job.get("env", {})})
    job.update(pid=child.pid, keeper_pid=os.getpid())
    _write_json(folder / "job.json", job)

    def forward(signum, _frame):
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the terminal that started the board may close
    rc = child.wait()
    (folder / "rc.tmp").write_text(str(rc))
    os.replace(folder / "rc.tmp", folder / "rc")
    return rc


if __name__ == "__main__":
    sys.exit(keep(Path(sys.argv[1])))
