#!/usr/bin/env bash
# The GPU training benchmark (bench/gpu_train.py) on the lent GPU machine: under 5 minutes on an H100/H200.
# Its python must have torch (CUDA), transformers >= 5 and peft; dstune's own source is put on the path.
# Writes bench/results/gpu_train.json, or $OUT/gpu_train.json when $OUT is set (the device tool's folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
export PYTHONUNBUFFERED=1
timeout 280 "$PY" bench/gpu_train.py --out "${OUT:-bench/results}/gpu_train.json" "$@"
