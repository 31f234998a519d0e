"""LoRA dropout on CPU: torch's dropout against dstune's fused-path mask, on one demo layer's input.

The input is a demo batch's activations entering a SmolLM2 layer: 784 tokens x 576 features. The baseline is
`torch.nn.functional.dropout(x, 0.05)` (what peft runs: a bernoulli_ mask and the scaled product). dstune draws the
mask with `dstune.train.fastlora.keep_mask` and applies it with one product (the 1/keep scale goes on the rank-r
side). Each side is timed in turn, A B A B, 9 repetitions of 50 calls; the medians and their ratio are reported,
with the memory read bandwidth measured in the same run.

    .venv/bin/python bench/dropout_mask.py          # ~10 s; writes bench/results/dropout_mask.json
    .venv/bin/python bench/dropout_mask.py --smoke  # 3 repetitions of 5 calls; writes to a temp folder

`--smoke` runs the same code with fewer, shorter repetitions (no model is involved), and writes to a temporary
folder, never to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from common import smoke_dir
from dstune.train.fastlora import keep_mask

ROOT = Path(__file__).resolve().parent.parent


def per_call(fn, calls: int = 50) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="3 repetitions of 5 calls; results to a temp folder")
    parser.add_argument("--out", help="the results file (default bench/results/dropout_mask.json)")
    args = parser.parse_args()
    repetitions, calls = (3, 5) if args.smoke else (9, 50)
    torch.manual_seed(0)
    x = torch.randn(784, 576)
    sides = {
        "torch dropout (peft)": lambda: torch.nn.functional.dropout(x, 0.05, True),
        "dstune keep_mask + product": lambda: x * keep_mask(x.shape, 0.95, x.device),
    }
    big = torch.randn(64 << 20 >> 2)
    bandwidth = big.numel() * 4 / min(per_call(big.sum, 5) for _ in range(3))
    times = {name: [] for name in sides}
    for fn in sides.values():
        per_call(fn, 5)  # warm-up
    for _ in range(repetitions):
        for name, fn in sides.items():
            times[name].append(per_call(fn, calls))
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["torch dropout (peft)"]
    result = {
        "benchmark": "dropout_mask", "mode": "smoke" if args.smoke else "full", "shape": list(x.shape), "p": 0.05,
        "repetitions": repetitions, "calls_per_repetition": calls,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "memory_read_gb_per_s": bandwidth / 1e9,
        "seconds": times, "median_ms": {k: v * 1e3 for k, v in medians.items()},
        "speedup": {k: base / v for k, v in medians.items()},
        # One pass over the input at read bandwidth: the floor for any mask-and-multiply.
        "floor_ms": x.numel() * 4 / bandwidth * 1e3,
    }
    name = "dropout_mask-smoke.json" if args.smoke else "dropout_mask.json"
    folder = smoke_dir("dropout_mask") if args.smoke else ROOT / "bench" / "results"
    out = Path(args.out) if args.out else folder / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("| dropout on 784 x 576 | median ms | vs torch |\n|---|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value * 1e3:.3f} | {base / value:.2f}x |")
    print(f"\nfloor (one read of the input at {bandwidth / 1e9:.1f} GB/s): {result['floor_ms']:.3f} ms")
    print(f"bench/dropout_mask: wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
