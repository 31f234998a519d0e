#!/usr/bin/env bash
# Every GPU check of the project in one call, for when a GPU machine is lent (under 5 minutes of device time):
#   1. bench/gpu_scale.py: 14B QLoRA (random weights, NF4 as it loads) at 2048 tokens, batch 1, checkpointing:
#      peak allocated memory against `dstune plan`, MFU against the bf16 GEMM peak; FSDP2 + QLoRA on one process
#      (does the 4-bit state survive fully_shard?); one DeepSpeed ZeRO-3 step;
#   2. bench/gpu_train.py: the training fast path against HF's padded full-logits path.
# Liger kernels (issue 26) are not in dstune yet; the script says which libraries it found and what it skipped.
# The machine has no internet: nothing is installed here. Results go to $OUT (the device tool's folder) or
# bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PY'
import importlib
for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "liger_kernel"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', 'ok')}")
    except Exception as exc:
        print(f"{name}: missing ({type(exc).__name__}); the checks that need it are skipped")
PY
status=0
timeout 170 "$PY" bench/gpu_scale.py --out "$OUT_DIR/gpu_scale.json" || { echo "gpu_scale failed or timed out"; status=1; }
timeout 110 "$PY" bench/gpu_train.py --out "$OUT_DIR/gpu_train.json" || { echo "gpu_train failed or timed out"; status=1; }
exit $status
