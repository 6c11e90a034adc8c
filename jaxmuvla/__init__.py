"""µ-VLA (Zhou et al., CVPR 2022): unsupervised VL pre-training via retrieval-based multi-granular alignment.

Will hold the weakly aligned corpus builder, the single-stream VL transformer (initialised from
`vlcore.encoders.BertForMaskedLM`), pre-training losses and the downstream heads.
"""
