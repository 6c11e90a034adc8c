#!/usr/bin/env bash
# The main job on the embedded default: RECO's chain and µ-VLA's, on one world and one frozen model.
#   world (TFDS, out/tfds) -> frozen two-tower model (out/two_tower), then side by side (2 cores are
#   better used by two chains than by one: each has single-threaded stretches):
#   RECO:  stores, indexes and training neighbours (out/reco_data) -> the fusion and its baselines
#          trained and evaluated (out/reco_runs); log in out/reco.log
#   µ-VLA: the weakly aligned corpus (out/muvla_corpus_quick) -> no pre-training and µ-VLA
#          (out/muvla_downstream_pretrain_runs) -> each fine-tuned on the world's VQA, NLVR2, VE and
#          RefCOCO+ tasks (out/muvla_downstream_runs). The round robin and the ablations are the
#          sweep's (python -m jaxmuvla.evaluate_all --variants=all): the main job has 20 minutes.
# and prints both tables (out/reco.md, out/muvla_downstream.md; JSON and plots beside them).
# Rerunning resumes or reuses every step. Extra arguments go to the RECO ablations, e.g.
# --variants=all (the whole sweep: k and memory swaps too) or --config.num_steps=100.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2
mkdir -p out
.venv/bin/python -m vlcore.main --config=configs/two_tower_world.py --config.world.data_dir=out/tfds \
  --workdir=out/two_tower

echo "RECO runs in the background (progress: out/reco.log); µ-VLA here."
.venv/bin/python -m jaxreco.ablations --config=configs/reco_world.py --variants=main \
  --config.encoder=two_tower:out/two_tower --config.data_dir=out/tfds --config.artefacts_dir=out/reco_data \
  --out out/reco.json "$@" > out/reco.log 2>&1 &
reco=$!
trap 'kill $reco 2>/dev/null || true' EXIT  # an interrupted main job leaves nothing running
.venv/bin/python -m jaxmuvla.evaluate_all --config=configs/muvla_finetune_world.py:vqa,main \
  --variants=no_pretraining,muvla --seeds=0 \
  --out out/muvla_downstream.json
if ! wait $reco; then
  echo "error: the RECO chain failed; its log: out/reco.log" >&2
  tail -5 out/reco.log >&2
  exit 1
fi
trap - EXIT
.venv/bin/python -m vlcore.world.show --data_dir out/tfds --config quick --split memory --n 16 --out out/world_grid.png
echo
echo "== RECO (out/reco.md) =="
cat out/reco.md
echo
echo "== µ-VLA downstream (out/muvla_downstream.md) =="
cat out/muvla_downstream.md
