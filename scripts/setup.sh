#!/usr/bin/env bash
# Create .venv (if missing) and install FluidLM with its pinned stack. Idempotent and quick when
# everything is already there. On a machine without an NVIDIA GPU it installs the CPU build of
# torch 2.13.0 first, so pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0"
  python -m pip install --quiet "torch==2.13.0"
fi
echo "[setup] installing fluidlm and its dependencies"
python -m pip install --quiet -e ".[dev]"
python -c "import torch, fluidlm; print(f'[setup] fluidlm {fluidlm.__version__}, torch {torch.__version__}')"
