#!/usr/bin/env bash
# The main job on the embedded default: generate the world (TFDS, into out/tfds), train its
# frozen two-tower model (LiT-style) into out/two_tower and print the zero-shot coarse/fine
# accuracies on the test split; also draws out/world_grid.png. Rerunning resumes or reuses.
# Extra arguments go to the trainer, e.g. --config.num_steps=100.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2
mkdir -p out
.venv/bin/python -m vlcore.main --config=configs/two_tower_world.py --config.world.data_dir=out/tfds \
  --workdir=out/two_tower "$@"
.venv/bin/python -m vlcore.world.show --data_dir out/tfds --config quick --split web --n 16 --out out/world_grid.png
