"""Out of memory or disk, told as one line: what dstune was doing, what ran out, and what to do about it."""

from __future__ import annotations

import errno

ADVICE = ("try a smaller train.batch_size / eval.batch_size / data.max_length, train.gradient_checkpointing: true "
          "or model.load_in_4bit: true")
# torch's CPU allocator says "can't allocate memory", mmap and the OS "Cannot allocate memory", MPS "out of memory".
OOM_PHRASES = ("cannot allocate memory", "can't allocate memory", "out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, torch.OutOfMemoryError, or a RuntimeError/OSError that says memory could not be allocated."""
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, OSError)) and any(phrase in text for phrase in OOM_PHRASES)


def _phase(exc: BaseException) -> str | None:
    """What dstune was doing when `exc` left it: the innermost function marked with dstune.errors.phase."""
    return getattr(exc, "dstune_phase", None)


def out_of_memory_message(exc: BaseException, command: str) -> str | None:
    """The one-line message for an out-of-memory failure (or one caused by it), else None."""
    cause = exc
    while cause is not None and not is_out_of_memory(cause):
        cause = cause.__cause__
    if cause is None:
        return None
    phase = _phase(cause) or _phase(exc) or f"running `dstune {command}`"
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return f"out of memory while {phase}: {first}; {ADVICE}"


def disk_full_message(exc: BaseException, command: str) -> str | None:
    """The one-line message for a write that failed because the disk (or the user's quota) is full, else None."""
    cause = exc
    while cause is not None and not (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)):
        cause = cause.__cause__
    if cause is None:
        return None
    where = f" ({cause.filename})" if cause.filename else ""
    phase = _phase(cause) or f"running `dstune {command}`"
    return (f"disk full while {phase}{where}: {cause.strerror}; free space there and run the command again "
            "(`dstune train --resume` continues from the last complete checkpoint)")


def resource_message(exc: BaseException, command: str) -> str | None:
    """One line for running out of memory or disk, else None."""
    return out_of_memory_message(exc, command) or disk_full_message(exc, command)
