# µ-VLA pre-training on the embedded world, on top of the world's frozen two-tower model (region
# features) and the bundled all-MiniLM-L6-v2 (the text side of the VisualBERT, and the sentence
# encoder that retrieves the corpus).
#
#   python -m vlcore.main --config=configs/two_tower_world.py --workdir=out/two_tower   # frozen model first
#   python -m vlcore.main --config=configs/muvla_world.py --workdir=out/muvla_runs/muvla
#   python -m jaxmuvla.pretrain_sweep --config=configs/muvla_world.py --out out/muvla_pretrain.json
#
# The argument after ':' picks a preset (tiny | quick | main | default; quick when absent; main is the
# main job's: quick with 150 steps); the corpus is
# built on first use into config.corpus.dir (python -m jaxmuvla.build_corpus does the same by hand).
# --config.variant=round_robin trains U-VisualBERT's round robin instead; --config.objectives.*
# switch objectives off (the sweep's ablations).
from jaxmuvla.pretrain import default_config

PRESETS = {
    # world, transformer layers kept of MiniLM's 6, batch, steps, held-out images
    "tiny": dict(world="tiny", layers=1, batch_size=8, num_steps=6, eval_images=16, log_every=2, save_every=3,
                 k=3, max_tokens=24, max_phrases=4, max_tag_tokens=16, max_regions=6),
    # quick: 1,000 steps (3.4 epochs) is what passing the gates took (docs/muvla_pretraining.md); at
    # 400 a balanced R-T alone had not yet brought MRC below half the class prior's
    "quick": dict(world="quick", layers=2, batch_size=32, num_steps=1000, eval_images=512, log_every=25,
                  save_every=250, k=10, max_tokens=24, max_phrases=6, max_tag_tokens=16, max_regions=6),
    # the main job's: quick's world, corpus and model, fewer steps (it has minutes, not the sweep's hour)
    "main": dict(world="quick", layers=2, batch_size=32, num_steps=150, eval_images=128, log_every=25,
                 save_every=150, k=10, max_tokens=24, max_phrases=6, max_tag_tokens=16, max_regions=6),
    "default": dict(world="default", layers=6, batch_size=128, num_steps=2000, eval_images=1024, log_every=50,
                    save_every=500, k=10, max_tokens=32, max_phrases=6, max_tag_tokens=24, max_regions=10),
}


def get_config(arg=None):
    preset = arg or "quick"
    if preset not in PRESETS:
        raise ValueError(f"configs/muvla_world.py: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    config = default_config()
    world = p["world"]
    config.corpus.dir = f"out/muvla_corpus_{world}"
    config.corpus.images = f"world:{world}:web"
    config.corpus.text = f"tfds:vl_world/{world}:text_corpus"
    for key in ("k", "max_tokens", "max_phrases", "max_tag_tokens", "max_regions"):
        config.corpus[key] = p[key]
    config.objectives.k = min(5, p["k"])
    config.model.num_layers = p["layers"]
    config.model.vocabulary = "corpus"  # the world's few hundred word pieces, not BERT's 30,522
    config.model.pooling = "mean"  # MiniLM's [CLS] is no sentence summary: with "cls" ITM stayed at chance
    config.model.feature_scale = 384 ** 0.5  # the two-tower's unit-norm 384-d crops -> about unit scale per dim
    # the paper's 5e-5 is for 20 epochs from BERT-base; a few hundred steps with a freshly
    # initialised visual projection need more (at 5e-5 the ITM head stayed at chance after 400)
    config.optimizer.lr = 3e-4
    config.batch_size = p["batch_size"]
    config.num_steps = p["num_steps"]
    config.optimizer.warmup_steps = max(1, p["num_steps"] // 10)
    config.eval_images = p["eval_images"]
    config.log_every = p["log_every"]
    config.save_every = p["save_every"]
    return config
