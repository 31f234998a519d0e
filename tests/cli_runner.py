"""Run `dstune` command lines, each in a forked child of one process that imported dstune once.

A fresh interpreter per command spends ~7 s importing transformers and peft; a fork spends nothing and keeps what
the tests check real: each child is its own process, with its own exit code (negative: killed by that signal, as
SIGKILL does) and the bytes it wrote to file descriptors 1 and 2. The driver process only imports, runs no torch op
and starts no thread, so forking it is safe.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Result:
    """What one command line did."""

    returncode: int
    stdout: str
    stderr: str


class CliRunner:
    """A warm driver process; each call forks it to run `dstune ARGV...` (one case: see `__call__`)."""

    def __init__(self, env: dict | None = None):
        self._tmp = tempfile.TemporaryDirectory()
        self._count = 0
        self._proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, env={**os.environ, **(env or {})})

    def __call__(self, argv: list[str], env: dict | None = None, address_space_margin_mb: int | None = None,
                 cwd: str | None = None) -> Result:
        """Run one command line; `env` is set in the child, and the margin caps its address space (RLIMIT_AS)."""
        self._count += 1
        out, err = (Path(self._tmp.name) / f"{self._count}.{kind}" for kind in ("out", "err"))
        case = {"argv": argv, "env": env or {}, "address_space_margin_mb": address_space_margin_mb,
                "stdout": str(out), "stderr": str(err), "cwd": cwd}
        self._proc.stdin.write(json.dumps(case) + "\n")
        self._proc.stdin.flush()
        reply = self._proc.stdout.readline()
        assert reply, "the fork driver died"
        return Result(json.loads(reply)["returncode"], out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait(timeout=60)
        self._tmp.cleanup()


_shared: CliRunner | None = None


def shared_runner() -> CliRunner:
    """One warm driver for the whole test session (closed at exit): its imports are paid once."""
    global _shared
    if _shared is None:
        import atexit

        _shared = CliRunner()
        atexit.register(_shared.close)
    return _shared


def run_cli(commands: list[list[str] | dict], env: dict | None = None, fresh: bool = False) -> list[Result]:
    """Run `dstune ARGV...` for each command (a list, or {"argv": [...], "address_space_margin_mb": N, "cwd": DIR}).

    `env` is set in each child. `fresh` starts a driver of its own with `env` in it from the start, for variables
    read when a process starts (MALLOC_ARENA_MAX).
    """
    cases = [c if isinstance(c, dict) else {"argv": c} for c in commands]
    if not fresh:
        runner = shared_runner()
        return [runner(**{**case, "env": {**(env or {}), **case.get("env", {})}}) for case in cases]
    runner = CliRunner(env)
    try:
        return [runner(**case) for case in cases]
    finally:
        runner.close()


def _vm_size() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))


def _child(case: dict) -> None:
    from dstune.cli.main import main

    for fd, path in ((1, case["stdout"]), (2, case["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.environ.update(case["env"])
    if case.get("cwd"):
        os.chdir(case["cwd"])
    margin = case.get("address_space_margin_mb")
    if margin:  # everything is imported already, so the margin is what the command itself may map
        limit = _vm_size() + (margin << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        code = main(case["argv"])
    except SystemExit as exc:  # argparse errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # what the interpreter would do: a traceback, exit 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _drive() -> None:
    import dstune.api  # noqa: F401  (the heavy imports, once, before forking)
    import dstune.cli.main  # noqa: F401
    import transformers.modeling_utils  # noqa: F401  (loaded by every model load; dstune.api no longer needs it)

    for line in sys.stdin:
        case = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                _child(case)
            finally:  # never let a child fall back into this loop
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    _drive()
