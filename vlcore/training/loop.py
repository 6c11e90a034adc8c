"""The one training loop every trainer of the project runs.

A trainer supplies a `TrainTask` (parameters, loss, training arrays, evaluation); the loop owns
the rest: the mesh, the optimiser from the config, the jitted step with the state donated,
deterministic batches, Orbax checkpoints with automatic resume and a save on SIGTERM,
TensorBoard scalars, the progress bar and throughput.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import jax
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.experimental import multihost_utils

from vlcore.training.checkpointing import Checkpointer, PreemptionSignal, prepare_workdir
from vlcore.training.input_order import RowSource, StepIndexedBatches
from vlcore.training.mesh import batch_sharding, check_global_batch, global_batch, make_mesh, replicated, state_shardings
from vlcore.training.metrics import MetricLogger, Throughput, compiled_flops

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: schedulers read it as "preempted, restart me"


class TrainTask(Protocol):
    """What a trainer tells the loop about its model."""

    def fingerprint(self) -> dict[str, Any]:
        """Identifies the model (architecture, frozen parts) for the work-dir check."""

    def init_params(self, rng: jax.Array) -> Any:
        """Trainable parameters."""

    def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array,
             step: jax.Array) -> tuple[jax.Array, dict]:
        """(scalar loss, extra scalar metrics) of one global batch at `step` (for schedules such as a
        curriculum; rng already depends on it)."""

    def train_arrays(self) -> Mapping[str, np.ndarray] | RowSource:
        """The training set: host arrays with a common leading dimension, or a RowSource that
        reads a step's rows on demand (vlcore.training.input_order)."""

    def evaluate(self, params: Any) -> dict[str, float]:
        """Evaluation metrics of trained parameters (may be empty)."""

    # Optional: `device_arrays(mesh) -> {key: jax.Array}`, arrays placed on the mesh once (e.g. a
    # retrieval memory) and merged into every batch the loss sees. They are jit arguments: closed
    # over, JAX 0.10 would bake them into the compiled step as (replicated) constants.


@dataclasses.dataclass
class TrainResult:
    state: train_state.TrainState
    history: list[dict[str, float]]
    final_metrics: dict[str, float]
    preempted: bool
    flops_per_step: float


def make_optimizer(cfg: ml_collections.ConfigDict, num_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW (or SGD) with linear warm-up and cosine/linear/constant decay, from `config.optimizer`."""
    warmup = int(cfg.get("warmup_steps", 0))
    decay = cfg.get("schedule", "cosine")
    if decay == "cosine":
        # Joined like the other two (not optax.warmup_cosine_decay_schedule, whose warm-up of at
        # least one step would make lr(0) = 0 with warmup_steps=0).
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)),
             optax.cosine_decay_schedule(cfg.lr, max(num_steps - warmup, 1))], [warmup])
    elif decay == "linear":
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)),
             optax.linear_schedule(cfg.lr, 0.0, max(num_steps - warmup, 1))], [warmup])
    elif decay == "constant":
        schedule = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)),
                                         optax.constant_schedule(cfg.lr)], [warmup])
    else:
        raise ValueError(f"config.optimizer.schedule: unknown {decay!r}; expected cosine, linear or constant")
    name = cfg.get("name", "adamw")
    if name == "adamw":
        tx = optax.adamw(schedule, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), weight_decay=cfg.get("weight_decay", 0.0))
    elif name == "sgd":
        tx = optax.sgd(schedule, momentum=cfg.get("momentum", 0.9))
    else:
        raise ValueError(f"config.optimizer.name: unknown {name!r}; expected adamw or sgd")
    clip = cfg.get("grad_clip_norm", 0.0)
    return (optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx), schedule


def make_train_step(task: TrainTask, schedule: Callable, seed: int):
    def train_step(state: train_state.TrainState, batch: Mapping[str, jax.Array],
                   resident: Mapping[str, jax.Array]):
        batch = {**batch, **resident}
        rng = jax.random.fold_in(jax.random.key(seed + 1), state.step)  # depends on the step only: resumable
        (loss, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(state.params, batch, rng, state.step)
        metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.global_norm(grads), **metrics}
        return state.apply_gradients(grads=grads), metrics
    return train_step


def train(task: TrainTask, config: ml_collections.ConfigDict, workdir: str | Path) -> TrainResult:
    """Trains `task` for `config.num_steps` steps in `workdir`, resuming from its latest checkpoint."""
    workdir = prepare_workdir(workdir, task.fingerprint())
    mesh = make_mesh(config.get("fsdp", 1))
    check_global_batch(config.batch_size, mesh)
    tx, schedule = make_optimizer(config.optimizer, config.num_steps)

    def init_state(rng):
        return train_state.TrainState.create(apply_fn=None, params=task.init_params(rng), tx=tx)

    abstract = jax.eval_shape(init_state, jax.random.key(config.seed))
    shardings = state_shardings(abstract, mesh)
    state = jax.jit(init_state, out_shardings=shardings)(jax.random.key(config.seed))

    checkpointer = Checkpointer(workdir / "checkpoints", config.save_every, config.keep_checkpoints,
                                async_save=config.get("async_checkpoints", True))
    state, start_step = checkpointer.restore_or_keep(state)

    batches = StepIndexedBatches(task.train_arrays(), config.batch_size, config.seed,
                                 jax.process_index(), jax.process_count())
    resident = task.device_arrays(mesh) if hasattr(task, "device_arrays") else {}
    step_fn = jax.jit(make_train_step(task, schedule, config.seed), donate_argnums=(0,),
                      in_shardings=(shardings, batch_sharding(mesh), {k: a.sharding for k, a in resident.items()}),
                      out_shardings=(shardings, replicated(mesh)))
    example = global_batch(batches.local_batch_at(start_step), mesh)
    compiled = step_fn.lower(state, example, resident).compile()
    flops = compiled_flops(compiled, mesh.size)

    logger = MetricLogger(workdir, config.num_steps, start_step, desc=config.get("name", "train"))
    throughput = Throughput(config.batch_size, flops)
    preempted = False
    try:
        with PreemptionSignal(checkpointer.manager) as preemption:
            for step, batch in zip(range(start_step, config.num_steps), batches.iterate(start_step, config.num_steps)):
                state, metrics = compiled(state, global_batch(batch, mesh), resident)
                throughput.step_done()
                logger.step_done()
                done = step + 1
                if done % config.log_every == 0 or done == config.num_steps:
                    logger.write(done, {**jax.device_get(metrics), **throughput.read_and_reset()})
                saved = checkpointer.save(done, state, force=done == config.num_steps)
                if done < config.num_steps and preemption.requested(done):
                    if not saved:  # a second save of the same step would raise StepAlreadyExistsError
                        checkpointer.save(done, state, force=True)
                    log.warning("SIGTERM: saved the checkpoint of step %d; rerun the same command to resume", done)
                    preempted = True
                    break
        checkpointer.close()
        final = {} if preempted else task.evaluate(state.params)
        if final:
            logger.write(int(state.step), {f"eval/{k}": v for k, v in final.items()})
    finally:
        logger.close()
    return TrainResult(state, logger.history, final, preempted, flops)


def params_to_host(params: Any) -> Any:
    """Full numpy copies of (possibly sharded, multi-process) parameters, for comparisons."""
    if jax.process_count() == 1:
        return jax.device_get(params)
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), params)
