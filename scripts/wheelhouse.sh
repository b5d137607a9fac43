#!/usr/bin/env bash
# Build the offline wheel bundle for a GPU machine without network (see README, "Running on GPUs").
#
#   bash scripts/wheelhouse.sh [--python 3.12] [--out wheelhouse] [--lock requirements/gpu-offline.txt]
#
# Run it on any Linux machine with access to the package registry and a Python that has this
# project's stack installed (the builder: $PYTHON, else the checkout's .venv/bin/python that
# scripts/setup.sh makes, else `python3`; it needs pip, setuptools >= 68, wheel and torch, torch only
# to run DeepSpeed's setup.py; a missing one is named before anything is downloaded). It
#   1. downloads every pinned wheel of the lock file for CPython --python on manylinux x86_64
#      (pip download --no-deps --only-binary=:all: --python-version ... --platform ...),
#   2. builds DeepSpeed's source archive into a pure-Python wheel with no compiled ops
#      (DS_BUILD_OPS=0; DeepSpeed JIT-builds an op only if one is asked for, FluidLM asks for none
#      with optim.torch_adam: true, the default),
#   3. builds this project's wheel from the checkout,
#   4. checks the result (scripts/gpu_check.py --check-bundle: one wheel per lock line and nothing
#      else, never two versions of one package, wheel tags that install on the target, every
#      requirement met by the bundle or the image, size under the limit) and only then moves it
#      to --out (replacing an older bundle there), and prints its size.
# Nothing is installed into the builder's environment.
set -euo pipefail
HERE=$(pwd)
cd "$(dirname "$0")/.."

PYV=3.12
OUT=
LOCK=requirements/gpu-offline.txt
MAX_MIB=40
if [ -n "${PYTHON:-}" ]; then BUILDER=$PYTHON
elif [ -x .venv/bin/python ]; then BUILDER=$(pwd)/.venv/bin/python
else BUILDER=python3
fi

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYV=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --lock) LOCK=$2; shift 2 ;;
    --max-mib) MAX_MIB=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "wheelhouse.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if ! [[ $PYV =~ ^3\.[0-9]+$ ]]; then
  echo "wheelhouse.sh: --python takes a version like 3.12, got '$PYV'" >&2; exit 2
fi
[ -f "$LOCK" ] || { echo "wheelhouse.sh: lock file $LOCK not found" >&2; exit 2; }
command -v "$BUILDER" >/dev/null || { echo "wheelhouse.sh: builder python '$BUILDER' not found (set PYTHON=)" >&2; exit 2; }
# The builds run without isolation, so the builder itself must hold what they import.
MISSING=$("$BUILDER" - <<'PY'
import importlib.util
try:  # first: a find_spec("pip") makes setuptools' distutils shim step aside, and `import setuptools` then fails
    import setuptools
    old = int(setuptools.__version__.split(".")[0]) < 68
except ImportError:
    setuptools = old = None
missing = [name for name in ("pip", "setuptools", "wheel", "torch")
           if (setuptools is None if name == "setuptools" else importlib.util.find_spec(name) is None)]
if old:
    missing.append(f"setuptools>=68 (it has {setuptools.__version__})")
print(" ".join(missing))
PY
)
if [ -n "$MISSING" ]; then
  echo "wheelhouse.sh: the builder $BUILDER lacks: $MISSING. Fix: bash scripts/setup.sh and rerun (the" \
       "builder defaults to its .venv), or PYTHON=/path/to/python with them, or" \
       "$BUILDER -m pip install 'setuptools>=68' wheel torch" >&2
  exit 2
fi
echo "[wheelhouse] builder: $BUILDER"
if [ -z "$OUT" ]; then OUT=$(pwd)/wheelhouse; fi
case "$OUT" in /*) ;; *) OUT=$HERE/$OUT ;; esac   # relative to where the command was typed
case "$LOCK" in /*) ;; *) [ -f "$HERE/$LOCK" ] && LOCK=$HERE/$LOCK ;; esac
ABI=cp${PYV/./}

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/wheelhouse.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/wheels"

# 1. Binary wheels (every lock line without a "# build:" marker), exact pins, no dependency resolution.
grep -v '^\s*#' "$LOCK" | grep -v '# build:' | sed 's/#.*//' | awk 'NF' > "$STAGE/binary.txt"
echo "[wheelhouse] downloading $(wc -l < "$STAGE/binary.txt") wheels for CPython $PYV manylinux x86_64"
"$BUILDER" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PYV" --implementation cp --abi "$ABI" --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 \
  --platform manylinux1_x86_64 --platform any \
  -r "$STAGE/binary.txt" -d "$STAGE/wheels"

# 2. Source-only packages ("name==version  # build: sdist VAR=VALUE ..."), built without isolation
#    (DeepSpeed's setup.py imports torch) and without the cache (a cached wheel may hold ops).
grep '# build:' "$LOCK" | while read -r line; do
  spec=$(echo "$line" | sed 's/#.*//' | xargs)
  envs=$(echo "$line" | sed 's/.*# build: *sdist *//')
  echo "[wheelhouse] building $spec from its source archive ($envs)"
  # shellcheck disable=SC2086
  env $envs "$BUILDER" -m pip wheel --quiet --disable-pip-version-check --no-cache-dir --no-deps \
    --no-build-isolation --no-binary "${spec%%==*}" "$spec" -w "$STAGE/wheels"
done

# 3. The project itself, from a clean copy of its package files (a stale build/ in the checkout
#    could add modules that no longer exist).
echo "[wheelhouse] building the fluidlm wheel from $(pwd)"
mkdir -p "$STAGE/src"
cp -r pyproject.toml README.md fluidlm "$STAGE/src/"
find "$STAGE/src" -name __pycache__ -prune -exec rm -rf {} +
"$BUILDER" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation "$STAGE/src" -w "$STAGE/wheels"

# 4. Check, then move into place.
"$BUILDER" scripts/gpu_check.py --check-bundle "$STAGE/wheels" --python-version "$PYV" --lock "$LOCK" \
  --max-mib "$MAX_MIB" --write-manifest
if [ -d "$OUT" ]; then
  rm -rf "$OUT.old" && mv "$OUT" "$OUT.old"
fi
mkdir -p "$(dirname "$OUT")"
cp -r "$STAGE/wheels" "$OUT"
rm -rf "$OUT.old"
echo "[wheelhouse] wrote $OUT: $(find "$OUT" -name '*.whl' | wc -l) wheels, $(du -sm "$OUT" | cut -f1) MiB on disk"
