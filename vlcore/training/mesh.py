"""The device mesh and how batches and parameters are laid out on it.

Data parallelism is `jax.jit` over a `Mesh` with a `data` axis (and an optional `fsdp` axis that
also shards parameters); `jax.pmap` is not used (in maintenance mode since JAX 0.8). The batch
is split over both axes, so every device sees `global_batch / device_count` examples.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from vlcore.training.config_check import ConfigError

BATCH_AXES = ("data", "fsdp")
T = TypeVar("T")


def make_mesh(fsdp: int = 1) -> Mesh:
    """A ('data', 'fsdp') mesh over every device of every process."""
    n = jax.device_count()
    if fsdp < 1 or n % fsdp:
        raise ConfigError(f"config.fsdp={fsdp} must be a positive divisor of the device count {n}")
    # Auto axes: the compiler propagates shardings (jax.make_mesh defaults to Explicit axes now,
    # which would make every cross-device contraction, like a contrastive loss, a type error).
    return jax.make_mesh((n // fsdp, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over all devices, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = 2**14) -> P:
    """Shards the largest dimension divisible by the fsdp size; small arrays stay replicated."""
    if fsdp == 1 or int(np.prod(shape)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of arrays (train state): replicated, or FSDP-sharded."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp)), abstract_state)


def check_global_batch(global_batch: int, mesh: Mesh) -> int:
    """The per-process batch; the global batch must split evenly over devices and processes."""
    if global_batch % mesh.size:
        raise ConfigError(f"config.batch_size {global_batch} is not divisible by the device count {mesh.size}")
    return global_batch // jax.process_count()


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into global arrays sharded on the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def process_zero_first(fn: Callable[[], T], name: str) -> T:
    """Runs `fn` on process 0, then on the others: for builders and caches that write shared files.

    The others find what process 0 wrote and only read it; nobody races on the same files.
    Nested calls run directly: the outer call already orders everything inside it (a barrier
    inside it would be reached by process 0 alone).
    """
    if jax.process_count() == 1 or _zero_first_depth:
        return fn()
    result = _nested(fn) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(f"process_zero_first:{name}")
    return _nested(fn) if jax.process_index() != 0 else result


_zero_first_depth = 0


def _nested(fn: Callable[[], T]) -> T:
    global _zero_first_depth
    _zero_first_depth += 1
    try:
        return fn()
    finally:
        _zero_first_depth -= 1
