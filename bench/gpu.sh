#!/usr/bin/env bash
# One prepared GPU check (shared/BENCHMARKS.md): 124m-preset training MFU in bf16 with
# torch.compile and fused AdamW, against a bf16 matmul measured in the same run, plus batch-1
# decode tokens/s. Installs nothing; finishes within 10 minutes. On a CPU machine it says so.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "bench/gpu.sh: no CUDA device here; nothing to measure (run it on a GPU machine)."
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
timeout 560 "$PY" bench/gpu_train.py --steps "${GPU_BENCH_STEPS:-300}"
