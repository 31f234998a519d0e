"""Guards around the training loop: non-finite steps, and preemption by SIGTERM."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading

from ..errors import DstuneError


class NonFiniteError(DstuneError):
    """Training stopped on a NaN or inf loss or gradient norm (exit code 1)."""


def _short(ids: list[str], limit: int = 32) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")


class NonFiniteGuard:
    """Decides what a step with a NaN or inf loss or gradient norm does: skipped, or the end of the run.

    The update of such a step is never applied (it would turn the weights into NaN). Up to `skip` of them are
    skipped and counted; the run stops at the one after, or at `patience` in a row (default: skip + 1).
    """

    def __init__(self, skip: int = 0, patience: int | None = None, skipped: list[dict] | None = None):
        self.skip = skip
        self.patience = patience or skip + 1
        self.skipped = list(skipped or [])
        self.in_a_row = 0

    def good_step(self) -> None:
        self.in_a_row = 0

    def bad_step(self, step: int, loss: float | None, grad_norm: float, sample_ids: list[str],
                 last_checkpoint: str | None) -> None:
        """Count a non-finite step, or raise NonFiniteError when the run has to stop."""
        self.in_a_row += 1
        what = f"loss {loss}, grad norm {grad_norm}"
        if len(self.skipped) >= self.skip or self.in_a_row >= self.patience:
            reason = (f"{self.in_a_row} in a row" if self.in_a_row >= self.patience and self.in_a_row > 1
                      else f"train.skip_nonfinite={self.skip} already used" if self.skip else "")
            resume = (f"the last good checkpoint is {last_checkpoint} (after fixing the cause: dstune train RECIPE "
                      "--resume)" if last_checkpoint else "no checkpoint was written yet")
            raise NonFiniteError(f"non-finite training step {step} ({what}{'; ' + reason if reason else ''}); "
                                 f"batch sample ids: {_short(sample_ids)}; {resume}; or allow skipping with "
                                 "train.skip_nonfinite: K")
        self.skipped.append({"step": step, "loss": None if loss is None or not math.isfinite(loss) else loss,
                             "grad_norm": None if not math.isfinite(grad_norm) else grad_norm,
                             "sample_ids": sample_ids})
        print(f"dstune: warning: skipped non-finite step {step} ({what}; {len(self.skipped)} of "
              f"train.skip_nonfinite={self.skip}); batch sample ids: {_short(sample_ids)}", file=sys.stderr, flush=True)


class Preemption:
    """On SIGTERM: finish the current optimizer step, write a checkpoint and stop, within a grace period.

    If the checkpoint is not written when the grace period ends, the process exits with code 1; the last complete
    checkpoint is still there to resume from.
    """

    def __init__(self, grace_seconds: float, checkpoints_dir, distributed: bool = False):
        self.grace_seconds = grace_seconds
        self.checkpoints_dir = checkpoints_dir
        self.distributed = distributed
        self.requested = False
        self.stopped_at: int | None = None
        self._timer: threading.Timer | None = None
        self._previous = None

    def install(self) -> None:
        """Catch SIGTERM (only the main thread can)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def uninstall(self) -> None:
        """Give SIGTERM back its previous handler and stop the grace timer."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        if self._timer is not None:
            self._timer.cancel()

    def _on_signal(self, signum, frame) -> None:
        if self.requested:
            return
        self.requested = True
        print(f"dstune: SIGTERM: writing a checkpoint after the current step (grace {self.grace_seconds:g} s)",
              file=sys.stderr, flush=True)
        self._timer = threading.Timer(self.grace_seconds, self._out_of_time)
        self._timer.daemon = True
        self._timer.start()

    def _out_of_time(self) -> None:
        from .checkpoint import latest_checkpoint

        last = latest_checkpoint(self.checkpoints_dir)
        print(f"dstune: error: SIGTERM: the grace period of {self.grace_seconds:g} s (train.preemption_grace_seconds) "
              f"ran out before the checkpoint was written; resume from {last or 'the start'} with "
              "`dstune train RECIPE --resume`", file=sys.stderr, flush=True)
        os._exit(1)

    def should_stop(self, accelerator) -> bool:
        """After an optimizer step: whether SIGTERM asked to stop (every rank decides the same: a collective)."""
        requested = self.requested
        if self.distributed:  # every rank has to stop at the same step, or the next collective hangs
            import torch

            flag = torch.tensor([float(requested)], device=accelerator.device)
            requested = bool(accelerator.reduce(flag, reduction="sum").item())
        return requested
