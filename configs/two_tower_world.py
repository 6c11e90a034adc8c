# The embedded world's frozen two-tower model (LiT-style: locked MiniLM text tower, small ViT).
#
#   python -m vlcore.main --config=configs/two_tower_world.py --workdir=out/two_tower
#   python -m vlcore.main --config=configs/two_tower_world.py:default --workdir=out/two_tower_default
#   python -m vlcore.main --config=configs/two_tower_world.py:tiny --workdir=/tmp/tt --config.num_steps=4
#
# The argument after ':' picks a preset (tiny | quick | default); --config.<field>=<value>
# overrides any field.
from vlcore.two_tower.task import default_config

PRESETS = {
    "tiny": dict(world="tiny", num_steps=6, batch_size=16, hidden=32, layers=1, heads=2, log_every=2, save_every=2),
    # measured on 2 cores: coarse zero-shot acc@1 0.84, fine 0.27 (test split), ~3 min of training
    "quick": dict(world="quick", num_steps=400, batch_size=256, hidden=64, layers=3, heads=2, log_every=25,
                  save_every=100),
    "default": dict(world="default", num_steps=1200, batch_size=256, hidden=96, layers=3, heads=3, log_every=25,
                    save_every=200),
}


def get_config(arg=None):
    preset = arg or "quick"
    if preset not in PRESETS:
        raise ValueError(f"configs/two_tower_world.py: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    config = default_config()
    config.world.config = p["world"]
    config.model.hidden_size = p["hidden"]
    config.model.num_hidden_layers = p["layers"]
    config.model.num_attention_heads = p["heads"]
    config.model.intermediate_size = 4 * p["hidden"]
    config.batch_size = p["batch_size"]
    config.num_steps = p["num_steps"]
    config.optimizer.warmup_steps = max(1, p["num_steps"] // 10)
    config.log_every = p["log_every"]
    config.save_every = p["save_every"]
    return config
