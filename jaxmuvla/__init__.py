"""µ-VLA (Zhou et al., CVPR 2022): unsupervised VL pre-training via retrieval-based multi-granular alignment.

Data (`vinvl`, `regions`, `text_corpus`, `phrases`, `sentence_bank`, `corpus`, `build_corpus`),
pre-training (`model`, `masking`, `losses`, `objectives`, `vocabulary`, `pretrain`,
`pretrain_sweep`, `export`) and the downstream tasks (`tasks/` readers and metrics, `heads`,
`finetune`, `evaluate_all`, `vqa_eval`).
"""
