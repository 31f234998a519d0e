"""Scale-out: the memory and time planner (`dstune plan`), multi-process launches, and tensor-parallel inference."""

# Memory (GB) and dense bf16 peak (TFLOP/s) of common training GPUs, from the vendors' data sheets (here, not in
# plan.py, so that the CLI lists them in --help without importing torch).
GPUS = {
    "a10g-24gb": (24, 125), "l4-24gb": (24, 121), "rtx4090-24gb": (24, 165), "l40s-48gb": (48, 362),
    "a100-40gb": (40, 312), "a100-80gb": (80, 312), "h100-80gb": (80, 989), "h200-141gb": (141, 989),
    "b200-180gb": (180, 2250),
}
