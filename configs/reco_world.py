# RECO on the embedded world, on top of the world's frozen two-tower model.
#
#   python -m vlcore.main --config=configs/two_tower_world.py --workdir=out/two_tower   # frozen model first
#   python -m vlcore.main --config=configs/reco_world.py --workdir=out/reco
#   python -m jaxreco.ablations --config=configs/reco_world.py --out out/ablations.json
#
# The argument after ':' picks a preset (tiny | quick | default; quick when absent, and the main job's);
# any field can be overridden with --config.<field>=<value>, e.g. --config.fusion.k=20.
#
# Every preset trains the way the paper does: the fusion sees its training pairs about three times
# (quick: 600 steps of 256 over 50,000 pairs), each pair's neighbours are retrieved from the
# training pairs themselves (its own entry excluded), and evaluation retrieves from the world's
# memory split. The world preset must match the two-tower model's (configs/two_tower_world.py).
from jaxreco.task import default_config, world_split

PRESETS = {
    "tiny": dict(world="tiny", num_steps=6, batch_size=16, log_every=2, save_every=3, k=5),
    "quick": dict(world="quick", num_steps=600, batch_size=256, log_every=50, save_every=200, k=10),
    "default": dict(world="default", num_steps=1200, batch_size=256, log_every=50, save_every=400, k=10),
}


def get_config(arg=None):
    preset = arg or "quick"
    if preset not in PRESETS:
        raise ValueError(f"configs/reco_world.py: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    config = default_config()
    world = p["world"]
    config.train_data = world_split("fusion_train", world)
    config.memory = world_split("fusion_train", world)
    test = world_split("test", world) | {"label_keys": "fine_label,coarse_label"}
    for task in list(config.eval.zero_shot) + list(config.eval.retrieval):
        task.update(test)
    config.eval_memories.test_time = [world_split("memory", world)]
    config.eval_memories.swap = [world_split("fusion_train", world)]
    config.eval_memories.enlarged = [world_split("memory", world), world_split("fusion_train", world)]
    config.num_steps = p["num_steps"]
    config.batch_size = p["batch_size"]
    config.optimizer.warmup_steps = max(1, p["num_steps"] // 10)
    config.log_every = p["log_every"]
    config.save_every = p["save_every"]
    config.fusion.k = p["k"]
    return config
