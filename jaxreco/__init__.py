"""RECO (Iscen et al., ICLR 2024): retrieval-enhanced contrastive vision-text models.

A frozen two-tower model and a memory of image-text pairs; an image searches the memory's
images and fetches their captions' embeddings (a text searches texts and fetches images), and a
one-layer fusion transformer per modality refines the query embedding. Only the fusion trains.

  fusion.py    φ (Fusion), the same-size MLP control, the mean-of-neighbours ablation
  model.py     φ_image + φ_text + temperature; the batch loss
  losses.py    RECO's three-term InfoNCE
  data.py      frozen artefacts (stores, indexes, precomputed neighbours), cached and resumable
  task.py      the trainer on the training core (`python -m vlcore.main --config=configs/reco_*.py`)
  evaluate.py  zero-shot classification and retrieval, each side refinable; prompts.py
  ablations.py the paper's ablations in one command
"""
