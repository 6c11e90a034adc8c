#!/usr/bin/env bash
# The main job on the embedded default, RECO's whole chain:
#   world (TFDS, out/tfds) -> frozen two-tower model (out/two_tower) -> memory, training
#   neighbours and fusion training of every ablation variant (out/reco_data, out/ablations_runs)
#   -> evaluation: prints the ablation table, writes out/ablations.{json,md,k.png,bars.png};
#   also draws out/world_grid.png.
# Rerunning resumes or reuses every step. Extra arguments go to the ablations, e.g.
# --variants=frozen,reco or --config.num_steps=100.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2
mkdir -p out
.venv/bin/python -m vlcore.main --config=configs/two_tower_world.py --config.world.data_dir=out/tfds \
  --workdir=out/two_tower
.venv/bin/python -m jaxreco.ablations --config=configs/reco_world.py --config.encoder=two_tower:out/two_tower \
  --config.data_dir=out/tfds --config.artefacts_dir=out/reco_data --out out/ablations.json "$@"
.venv/bin/python -m vlcore.world.show --data_dir out/tfds --config quick --split memory --n 16 --out out/world_grid.png
