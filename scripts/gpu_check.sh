#!/usr/bin/env bash
# Every GPU check in one command on an offline GPU machine (README, "Running on GPUs"):
#
#   bash scripts/gpu_check.sh [--wheelhouse DIR] [--out DIR] [--only STEP,...] [--force] [--dry-run]
#
# Installs the bundle built by scripts/wheelhouse.sh into OUT/site (no network, no root), runs the
# steps kernels, kernel-bench, train, long-context (each under its own time cap, each skipped when
# its result exists), and writes OUT/summary.md. Without CUDA it exits 2; --dry-run prints the plan
# and checks the bundle on any machine. The logic is scripts/gpu_check.py (tested on CPU in CI);
# `bash scripts/gpu_check.sh --help` lists every option and the per-step budget.
# PYTHON= selects the interpreter (default python3: the image's, with its CUDA torch and triton).
set -euo pipefail
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || { echo "gpu_check.sh: python '$PY' not found (set PYTHON=)" >&2; exit 2; }
GPU_CHECK_INVOCATION="bash scripts/gpu_check.sh $(printf '%q ' "$@")"
export GPU_CHECK_INVOCATION
exec "$PY" "$(dirname "$0")/gpu_check.py" "$@"
