"""What RECO and µ-VLA share.

  encoders/, hf_checkpoint.py   Flax CLIP and BERT, HF checkpoint import/export
  sentence_encoder.py           all-MiniLM-L6-v2 sentence embeddings
  frozen_encoders.py            a frozen two-tower model behind one interface
  training/                     the one training loop on a device mesh, config checks
  world/, two_tower/            the embedded world and its frozen two-tower model
  contrastive.py, clip_benchmark.py, paired_stats.py, atomic_files.py, errors.py   shared pieces
"""
