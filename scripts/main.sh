#!/usr/bin/env bash
# The main job on the embedded default. For now: verify the Flax encoders against the PyTorch
# reference on a ViT-B/32-shaped CLIP and the bundled all-MiniLM-L6-v2, and time both.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2
mkdir -p out
exec .venv/bin/python -m benchmarks.encoders --out out/encoders.json "$@"
