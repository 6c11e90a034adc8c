"""Work split over the JAX processes of a job (the hosts of a pod), results gathered on every one.

Process p of P takes the contiguous rows [p * n // P, (p + 1) * n // P): disjoint, covering all
rows, sizes within one of each other. `map_over_processes` applies a row-wise function to this
process's share and all-gathers the pieces, so every process ends with the one-process result.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def process_share(n: int, process_index: int, process_count: int) -> slice:
    """The rows of [0, n) that process `process_index` of `process_count` works on."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index}: need 0 <= index < process_count={process_count}")
    return slice(process_index * n // process_count, (process_index + 1) * n // process_count)


def map_over_processes(fn: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, *,
                       process_index: int | None = None, process_count: int | None = None,
                       allgather: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """fn(rows) computed as each process's fn(share), all-gathered in row order; fn must treat rows
    independently and return [len(share), ...] of one shape and dtype on every process. Every process
    must call this (it is a collective). Defaults: this JAX process and `process_allgather`."""
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    rows = np.asarray(rows)
    if process_count == 1:
        return np.asarray(fn(rows))
    if allgather is None:
        from jax.experimental import multihost_utils

        def allgather(x: np.ndarray) -> np.ndarray:
            return np.asarray(multihost_utils.process_allgather(x))  # [processes, ...]

    n = len(rows)
    shares = [process_share(n, p, process_count) for p in range(process_count)]
    width = max(s.stop - s.start for s in shares)
    mine = rows[shares[process_index]]
    # A share of 0 rows (fewer rows than processes) still computes one padded row, so that every
    # process knows the output's shape and dtype for the gather.
    padded = np.concatenate([mine, np.repeat(rows[:1], width - len(mine), axis=0)]) if len(mine) < width else mine
    out = np.asarray(fn(padded))
    gathered = allgather(out)
    return np.concatenate([gathered[p][:s.stop - s.start] for p, s in enumerate(shares)])
