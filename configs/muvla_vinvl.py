# µ-VLA pre-training on real data: VinVL detections of unpaired images (e.g. Conceptual Captions
# with the captions thrown away), any text corpus (e.g. BookCorpus), any HF BERT or VisualBERT
# directory for the transformer (the paper: bert-base-uncased).
#
# Build the weakly aligned corpus once (resumable; several processes split the images), then train:
#
#   python -m jaxmuvla.build_corpus --images=vinvl:/data/cc/features.tsv,/data/cc/predictions.tsv \
#       --classes=/data/vinvl/labelmap.txt --corpus='/data/bookcorpus/*.txt.gz' --out=/data/muvla_corpus \
#       --k=5 --max_regions=50 --max_tokens=40 --max_phrases=8 --max_tag_tokens=32
#   python -m vlcore.main --config=configs/muvla_vinvl.py --workdir=runs/muvla \
#       --config.corpus.dir=/data/muvla_corpus --config.model.init=/models/bert-base-uncased
#   python -m jaxmuvla.pretrain_sweep --config=configs/muvla_vinvl.py --variants=main --out runs/muvla.json \
#       --config.corpus.dir=/data/muvla_corpus --config.model.init=/models/bert-base-uncased
#
# corpus.k, max_regions, max_tokens, max_phrases and max_tag_tokens must be those the corpus was
# built with (a mismatch is refused before anything trains). The paper's schedule: AdamW 5e-5,
# 10 % warm-up, linear decay, batch 480, 20 epochs (num_steps = 20 x images / 480; the default
# below is for Conceptual Captions' 3.3M images); the curriculum starts after 1 epoch.
from jaxmuvla.pretrain import default_config

CC_IMAGES = 3_300_000


def get_config(arg=None):
    del arg
    config = default_config()
    config.name = "muvla_vinvl"
    config.corpus.dir = "REQUIRED"  # --config.corpus.dir=<a corpus built by python -m jaxmuvla.build_corpus>
    config.corpus.images = "vinvl"  # a prebuilt corpus: only the world's is built on first use
    config.corpus.encoder = ""
    config.corpus.text = ""
    config.corpus.data_dir = ""
    config.corpus.update(dict(k=5, max_regions=50, max_tokens=40, max_phrases=8, max_tag_tokens=32))
    config.model.init = ""  # "" = the bundled all-MiniLM-L6-v2; the paper: a bert-base-uncased directory
    config.model.pooling = "mean"  # "cls" (VisualBERT's) for a BERT whose [CLS] was trained (bert-base-uncased: NSP)
    config.model.num_layers = 0  # every layer of the checkpoint
    config.model.vocabulary = "full"
    config.objectives.k = 5
    config.objectives.max_masked = 8
    config.eval_images = 5000
    config.batch_size = 480
    config.num_steps = 20 * CC_IMAGES // 480
    config.optimizer.warmup_steps = config.num_steps // 10
    config.log_every = 100
    config.save_every = 2000
    return config
