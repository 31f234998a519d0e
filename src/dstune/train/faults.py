"""Fault injection for the reliability tests, switched on by the DSTUNE_FAULT environment variable.

`DSTUNE_FAULT` holds `kind=value` pairs separated by `;`:
- `kill_at_step=S`: SIGKILL this process in the middle of optimizer step S (in its last micro-batch's forward);
- `sigterm_at_step=S`: send this process SIGTERM there instead (a preemption notice);
- `kill_after_checkpoint_write=K`: SIGKILL this process right after the K-th write of a checkpoint save;
- `enospc_at_checkpoint_write=K`: fail the K-th checkpoint write with "No space left on device";
- `nan_loss_at_steps=S1,S2`: make the loss of those optimizer steps NaN (the backward pass then gives NaN gradients).

Real faults (a SIGKILL, an OSError, a NaN through backward), not mocks: the code under test handles them as it would
handle the ones of a preempted GPU, a full disk or a diverging run. Unset, every hook is a no-op.
"""

from __future__ import annotations

import errno
import os
import signal
from functools import cache

_writes = 0


@cache
def _faults() -> dict[str, str]:
    spec = os.environ.get("DSTUNE_FAULT", "")
    return dict(item.split("=", 1) for item in spec.split(";") if "=" in item)


def _int(kind: str) -> int | None:
    value = _faults().get(kind)
    return int(value) if value else None


def checkpoint_write(what: str) -> None:
    """Called after each write of a checkpoint save; may kill the process or raise ENOSPC there."""
    global _writes
    if not _faults():
        return
    _writes += 1
    if _writes == _int("enospc_at_checkpoint_write"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)
    if _writes == _int("kill_after_checkpoint_write"):
        print(f"dstune: fault injection: SIGKILL after checkpoint write {_writes} ({what})", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def in_step(step: int, last_micro_batch: bool) -> None:
    """Called in each micro-batch of optimizer step `step` (1-based); may signal the process in the last one."""
    if not (_faults() and last_micro_batch):
        return
    if step == _int("sigterm_at_step"):
        os.kill(os.getpid(), signal.SIGTERM)
    if step == _int("kill_at_step"):
        print(f"dstune: fault injection: SIGKILL in step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def nan_loss(step: int) -> bool:
    """Whether the loss of optimizer step `step` (1-based) is to be made NaN."""
    steps = _faults().get("nan_loss_at_steps")
    return bool(steps) and str(step) in steps.split(",")
