"""RECO (Iscen et al., ICLR 2024): retrieval-enhanced contrastive vision-text models.

Will hold the fusion modules, the RECO model and trainer, and the zero-shot and retrieval
evaluators; built on `vlcore` (encoders, training core) and `retrieval` (memory, kNN).
"""
