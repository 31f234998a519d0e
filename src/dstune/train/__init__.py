"""Training: one explicit loop on accelerate (loop.py) with methods and objectives as plugins, packing, a fused LoRA
linear and a supervised-positions loss.

Names load on first use, so `dstune.train.loss` or `.packing` import without the trainer's stack (the GPU bench
runs them where dstune's other dependencies are absent).
"""

import importlib

_EXPORTS = {
    "CausalCollator": ".collate", "PackingCollator": ".packing", "supervised_lm_loss": ".loss",
    "supervised_positions": ".loss", "linear_cross_entropy": ".loss", "enable_fused_lora": ".fastlora",
    "TrainResult": ".loop", "train": ".loop", "encode_records": ".loop", "Objective": ".objectives",
    "LossOutput": ".objectives",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
