# Fine-tuning µ-VLA on one of the embedded world's four downstream tasks (vl_world_tasks), from a
# pre-training work dir of configs/muvla_world.py (same preset) or from no pre-training at all.
#
#   python -m vlcore.main --config=configs/muvla_finetune_world.py:vqa \
#       --config.init=out/muvla_pretrain_runs/muvla --workdir=out/muvla_finetune/muvla/vqa
#   python -m jaxmuvla.evaluate_all --out out/muvla_downstream.json     # every variant x task
#
# The argument: TASK[,PRESET] with TASK in vqa | nlvr2 | ve | refcoco and PRESET the pre-training
# preset (tiny | quick | main; quick when absent; main: the main job's, fewer steps). config.init = "" fine-tunes the text checkpoint alone
# (no pre-training). Protocol: the task's val/dev split scored every eval_every steps, the test
# splits scored once with the best step's parameters; dropout at the checkpoint's rate (MiniLM: 0.1).
import importlib.util
from pathlib import Path

from jaxmuvla.finetune import default_config

# steps and batch per preset; the world tasks' train splits are a few thousand examples. The val
# split is scored every eval_every steps (checkpoints saved as often, kept until selection is done);
# lr_grid: the learning rates evaluate_all tries per (variant, task), around the 1e-4 of before.
PRESETS = {
    "tiny": dict(batch_size=8, num_steps=6, log_every=2, eval_every=2, lr_grid=(1e-4, 3e-4)),
    "quick": dict(batch_size=32, num_steps=300, log_every=50, eval_every=50, lr_grid=(5e-5, 1e-4, 2e-4)),
    "main": dict(batch_size=32, num_steps=100, log_every=50, eval_every=25, lr_grid=(1e-4,)),  # the main job's minutes
}


def _pretraining_config(preset):
    spec = importlib.util.spec_from_file_location("muvla_world", Path(__file__).with_name("muvla_world.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def get_config(arg=None):
    task, _, preset = (arg or "vqa").partition(",")
    preset = preset or "quick"
    if preset not in PRESETS:
        raise ValueError(f"configs/muvla_finetune_world.py: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    config = default_config()
    config.downstream = task
    config.name = task
    config.pretrain = _pretraining_config(preset)
    config.data.world = "tiny" if preset == "tiny" else "quick"
    config.data.data_dir = config.pretrain.corpus.data_dir
    for key, value in PRESETS[preset].items():
        config[key] = value
    config.optimizer.warmup_steps = max(1, config.num_steps // 10)
    return config
