"""Trains a model of this package from an ml_collections config.

    python -m vlcore.main --config=configs/two_tower_world.py --workdir=out/two_tower
    python -m vlcore.main --config=configs/two_tower_world.py:tiny --config.num_steps=10 --workdir=/tmp/w

The config names its task module (`config.task`, e.g. `vlcore.two_tower.task`), which provides
`default_config()` and `make_task(config)`. Rerunning the same command resumes from the last
checkpoint in the work dir. Several processes: add `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` to each, or `--auto_distributed` where JAX detects the cluster
(every worker of a TPU VM slice runs the same command).
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (configs/*.py[:arg])", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, TensorBoard events and results")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "index of this process (multi-process runs)")
_AUTO_DISTRIBUTED = flags.DEFINE_bool(
    "auto_distributed", False, "jax.distributed.initialize() with no arguments: JAX finds the coordinator, the "
    "process count and this process's index itself on TPU VM slices, SLURM, Open MPI and GKE")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
    import jax

    from vlcore.training.config_check import ConfigError

    if _AUTO_DISTRIBUTED.value:
        if _COORDINATOR.value is not None:
            raise ConfigError("--auto_distributed and --coordinator_address exclude each other")
        try:
            jax.distributed.initialize()  # the cluster environment names everything
        except ValueError as e:  # no cluster JAX knows (e.g. a workstation)
            raise ConfigError(f"--auto_distributed: JAX found no cluster to join ({e}); pass "
                              "--coordinator_address, --num_processes and --process_id instead") from None
        return
    if _COORDINATOR.value is None:
        return
    # Cross-process collectives on CPU need gloo. Set unconditionally (it only concerns the CPU
    # client): asking jax.default_backend() here would initialise the backends, after which
    # jax.distributed.initialize refuses to run.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def main(argv: list[str]) -> int:
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    config = _CONFIG.value
    try:
        task_module = importlib.import_module(config.task)
    except (AttributeError, ImportError) as e:
        print(f"error: config.task: cannot import the task module ({e})", file=sys.stderr)
        return 2

    from vlcore.errors import InputError
    from vlcore.training.config_check import validate_config
    from vlcore.training.mesh import check_global_batch, make_mesh
    from vlcore.training.checkpointing import check_workdir_path
    from vlcore.training.loop import PREEMPTED_EXIT_CODE, train

    try:
        validate_config(config, task_module)
        check_workdir_path(_WORKDIR.value)  # before any data is built
        initialize_distributed()
        check_global_batch(config.batch_size, make_mesh(config.fsdp))  # before any data is built
        # a task that writes files of its own (e.g. results in an official format) takes the work dir
        takes_workdir = "workdir" in inspect.signature(task_module.make_task).parameters
        task = task_module.make_task(config, **({"workdir": _WORKDIR.value} if takes_workdir else {}))
        result = train(task, config, _WORKDIR.value)
    except InputError as e:  # bad input of any stage (config, work dir, checkpoint, data): one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.preempted:
        return PREEMPTED_EXIT_CODE
    if result.final_metrics:
        print(json.dumps({"step": int(result.state.step), **result.final_metrics}, indent=2))
    return 0


if __name__ == "__main__":
    from vlcore.training.config_check import parse_flags

    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
