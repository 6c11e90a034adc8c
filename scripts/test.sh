#!/usr/bin/env bash
# Sets up .venv with the test extras (scripts/setup.sh --dev) and runs the whole test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m pytest "$@"
