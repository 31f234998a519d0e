"""Helpers every benchmark shares: the machine it ran on and the fp32 GEMM ceiling (../shared/BENCHMARKS.md)."""

from __future__ import annotations

import os
import platform
import statistics
import time


def gemm_peak_flops() -> float:
    """fp32 FLOP/s of a large matmul on this machine, now (the ceiling of BENCHMARKS.md rule 3)."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / statistics.median(times)


def machine() -> dict:
    import torch
    import transformers
    import peft

    from dstune.evaluate.report import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}
