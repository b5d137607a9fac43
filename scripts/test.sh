#!/usr/bin/env bash
# The README's test command: set up (scripts/setup.sh) and run the whole suite on the CPU.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k kernels`).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "ERROR: pytest collected no tests (exit 5): the test command checked nothing." >&2
  exit 1
fi
exit "$status"
