# RECO on real data: a local HF CLIP checkpoint, a memory of COCO captions, zero-shot evaluation
# on Stanford Cars, CUB-200-2011 and Oxford Flowers 102 (class names from the TFDS metadata,
# CLIP's prompt templates) and COCO image<->text retrieval.
#
# Prepare the TFDS datasets once (`tfds build cars196 caltech_birds2011 oxford_flowers102
# coco_captions --data_dir=/data/tfds`, or copy prepared ones), then:
#
#   python -m vlcore.main --config=configs/reco_hf_clip.py --workdir=runs/reco_clip \
#       --config.encoder=hf_clip:/models/clip-vit-base-patch32 --config.data_dir=/data/tfds
#   python -m jaxreco.ablations --config=configs/reco_hf_clip.py --out runs/ablations.json \
#       --config.encoder=hf_clip:/models/clip-vit-base-patch32 --config.data_dir=/data/tfds
#
# The fusion is the paper's size for a 512-d CLIP (PAPER_FUSION, 3.15M parameters per modality).
# As in the paper, the fusion trains on the memory's own pairs, each pair's own entry excluded
# from its neighbours together with near-duplicate images (cosine > 0.95).
from jaxreco.task import default_config

COCO = dict(dataset="coco_captions", image_key="image", caption_key="captions/text", label_keys="")


def classification(name: str, dataset: str) -> dict:
    return dict(name=name, dataset=dataset, split="test", image_key="image", caption_key="", label_keys="label",
                label_key="label", prompts=dataset, refine_image=True, refine_text=True)


def get_config(arg=None):
    del arg
    config = default_config()
    config.encoder = "hf_clip:REQUIRED"  # --config.encoder=hf_clip:/path/to/an/hf/clip/directory
    config.data_dir = ""  # "" = TFDS's default data dir
    config.artefacts_dir = "runs/reco_clip_data"
    config.encode_batch_size = 256
    config.encode_shard_size = 65536
    config.memory = dict(COCO, split="train")
    config.train_data = dict(COCO, split="train")
    config.eval.memory = ""
    config.eval.zero_shot = [
        classification("cars", "cars196"),
        classification("cub", "caltech_birds2011"),
        classification("flowers", "oxford_flowers102"),
    ]
    config.eval.retrieval = [dict(name="coco_", **COCO, split="validation", refine_image=True, refine_text=False)]
    config.eval_memories.test_time = []
    config.eval_memories.swap = [dict(COCO, split="validation")]
    config.eval_memories.enlarged = [dict(COCO, split="train"), dict(COCO, split="validation")]
    config.retrieval.index = "faiss_hnsw"  # approximate search for a memory of ~100k and more
    config.retrieval.duplicate_threshold_image = 0.95
    config.fusion.update(dict(kind="transformer", width=0, num_heads=8, mlp_ratio=4.0, k=10, residual=False,
                              gate_init=1.0))
    config.batch_size = 1024
    config.num_steps = 5000
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_steps = 500
    config.log_every = 50
    config.save_every = 500
    return config
