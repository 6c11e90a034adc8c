"""Checkpoints with Orbax: async saves every N steps, keep the last K, resume from the latest.

The work dir also records which model it belongs to (`model.json`), so a run pointed at the
work dir of a different model stops with a clear error instead of restoring the wrong weights.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from vlcore.errors import InputError
from vlcore.atomic_files import atomic_write_json, differing_keys

log = logging.getLogger(__name__)


class WorkdirError(InputError):
    """A work dir that cannot be used for this run."""


def check_workdir_path(workdir: str | os.PathLike) -> None:
    """Work dirs are local (or mounted) paths: pathlib would turn gs://b/x into a local "gs:" dir."""
    if "://" in os.fspath(workdir):
        raise WorkdirError(f"workdir {os.fspath(workdir)}: a work dir must be a local or mounted path (its Orbax "
                           "checkpoints and TensorBoard events are not on the vlcore.fs layer yet); memory stores, "
                           "indexes and neighbour shards (config.artefacts_dir) may be on gs://")


def prepare_workdir(workdir: str | os.PathLike, model_fingerprint: dict[str, Any]) -> Path:
    """Creates the work dir (or checks it), and refuses one that holds a different model."""
    check_workdir_path(workdir)
    workdir = Path(workdir).absolute()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-probe-{jax.process_index()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(f"workdir {workdir} is not writable ({e.strerror})") from None
    record = workdir / "model.json"
    fingerprint = json.loads(json.dumps(model_fingerprint, sort_keys=True))  # normalise tuples etc.
    if record.exists():
        diff = differing_keys(json.loads(record.read_text()), fingerprint)
        if diff:
            raise WorkdirError(
                f"workdir {workdir} holds a checkpoint of a different model (differs in: {', '.join(diff)}); "
                "use a new --workdir or the config that trained it"
            )
    elif jax.process_index() == 0:
        atomic_write_json(record, fingerprint)
    return workdir


class Checkpointer:
    """A thin layer over `ocp.CheckpointManager` for one train state."""

    def __init__(self, directory: Path, save_every: int, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save,
            # Exactly every `save_every` steps: `save_interval_steps` also saves the first step of a
            # fresh run (Orbax's InitialSavePolicy).
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
        )
        self.manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_or_keep(self, state: Any) -> tuple[Any, int]:
        """The latest saved state (with `state`'s shardings) and its step, or (state, 0)."""
        step = self.manager.latest_step()
        if step is None:
            return state, 0
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        log.info("resuming from the checkpoint of step %d", step)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract)), step

    def save(self, step: int, state: Any, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class PreemptionSignal:
    """Whether the job was asked to stop (SIGTERM): checked by the loop at every step boundary.

    One process: a SIGTERM handler sets a flag. Several processes: JAX's preemption sync service
    (started by `jax.distributed.initialize`) catches the signal on whichever host gets it and
    agrees in the background on a step at which every host stops; Orbax's
    `CheckpointManager.reached_preemption(step)` reads that agreement without a collective per
    step. (A Python SIGTERM handler would replace the service's, so none is installed then.)
    """

    def __init__(self, manager: ocp.CheckpointManager):
        self._manager = manager
        self._received = False
        self._previous = None
        self._single = jax.process_count() == 1

    def __enter__(self) -> "PreemptionSignal":
        if self._single:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._single:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        self._received = True

    def requested(self, step: int) -> bool:
        """True once the job should save `step` and stop (every process gets the same answer)."""
        if self._single:
            return self._received
        return self._manager.reached_preemption(step)
