#!/usr/bin/env bash
# One prepared GPU check (shared/BENCHMARKS.md): 124m-preset training MFU in bf16 with
# torch.compile and fused AdamW (plain, then under FSDP2 with torchrun), against a bf16 matmul measured in the same run, plus batch-1
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
timeout 330 "$PY" bench/gpu_train.py --steps "${GPU_BENCH_STEPS:-300}"
# The same model under FSDP2, one rank per GPU (a 1-GPU machine runs FSDP2 on 1 rank).
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
TORCHRUN="$(dirname "$PY")/torchrun"
[ -x "$TORCHRUN" ] || TORCHRUN=torchrun
timeout 230 "$TORCHRUN" --nproc-per-node "${GPUS:-1}" bench/gpu_train.py --parallel fsdp \
  --steps "${GPU_FSDP_STEPS:-150}"
