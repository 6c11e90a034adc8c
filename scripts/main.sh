#!/usr/bin/env bash
# The main job on the embedded default: RECO's whole chain, then (later) µ-VLA's.
#   world (TFDS, out/tfds) -> frozen two-tower model (out/two_tower) -> stores, indexes and
#   training neighbours (out/reco_data) -> the fusion and its baselines trained and evaluated
#   (out/reco_runs) -> prints RECO's table and how sure its lead is; writes out/reco.{json,md,bars.png}
#   and out/world_grid.png.
# Rerunning resumes or reuses every step. Extra arguments go to the RECO ablations, e.g.
# --variants=all (the whole sweep: k and memory swaps too) or --config.num_steps=100.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2
mkdir -p out
.venv/bin/python -m vlcore.main --config=configs/two_tower_world.py --config.world.data_dir=out/tfds \
  --workdir=out/two_tower
.venv/bin/python -m jaxreco.ablations --config=configs/reco_world.py --variants=main \
  --config.encoder=two_tower:out/two_tower --config.data_dir=out/tfds --config.artefacts_dir=out/reco_data \
  --out out/reco.json "$@"
.venv/bin/python -m vlcore.world.show --data_dir out/tfds --config quick --split memory --n 16 --out out/world_grid.png
