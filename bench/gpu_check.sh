#!/usr/bin/env bash
# GPU smoke (about 2 minutes on one GPU): SASRec and a tiny end-to-end HLLM, one Ray Train worker,
# NCCL, bf16, DeepSpeed ZeRO-2, one epoch each on MovieLens-100K; GPU evaluation; 5 alignment steps.
# Needs the project's dependencies with a CUDA build of torch (the GPU image, or a venv made by
# `make install` with a CUDA torch). Writes bench/results/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONUNBUFFERED=1 RAY_DEDUP_LOGS=0
exec "$PY" bench/gpu_check.py "$@"
