"""Deterministic, resumable batch order: the examples of step s depend only on (seed, s).

Each epoch is a permutation drawn from (seed, epoch); step s takes the s-th slice of the
concatenated permutations, and process p takes its contiguous part of that global batch. A run
resumed at step s therefore sees exactly the examples the uninterrupted run saw from step s on.

The training set is either arrays (in memory, memory-mapped, or any `x[index]` view) or a
`RowSource` that reads the rows of a step on demand (e.g. neighbours streamed from their shards),
so host memory holds a few batches, not the split. `iterate` reads ahead on a host thread while
the devices run the current step.
"""

from __future__ import annotations

import concurrent.futures
from typing import Iterator, Mapping, Protocol, runtime_checkable

import numpy as np

from vlcore.training.config_check import ConfigError


@runtime_checkable
class RowSource(Protocol):
    """A training set read row by row: `read_rows([i, j, ...])` -> {key: [len(index), ...]}."""

    def __len__(self) -> int: ...

    def read_rows(self, index: np.ndarray) -> dict[str, np.ndarray]: ...


class ArrayRows:
    """Arrays with a common leading dimension as a RowSource."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"input arrays have different lengths: {sizes}")
        self.arrays = dict(arrays)
        self.count = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self.count

    def read_rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self.arrays.items()}


class StepIndexedBatches:
    """Batches of a training set (arrays or a RowSource), indexed by training step."""

    def __init__(self, data: Mapping[str, np.ndarray] | RowSource, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        self.rows = data if isinstance(data, RowSource) else ArrayRows(data)
        self.num_examples = len(self.rows)
        if global_batch > self.num_examples:
            raise ConfigError(f"config.batch_size {global_batch} exceeds the {self.num_examples} training examples")
        if global_batch % process_count:
            raise ConfigError(f"config.batch_size {global_batch} is not divisible by the process count {process_count}")
        self.global_batch, self.seed = global_batch, seed
        self.local_batch = global_batch // process_count
        self.process_index = process_index
        self.steps_per_epoch = self.num_examples // global_batch  # the remainder of an epoch is dropped

    def global_indices(self, step: int) -> np.ndarray:
        epoch, offset = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        return order[offset * self.global_batch:(offset + 1) * self.global_batch]

    def local_indices(self, step: int) -> np.ndarray:
        start = self.process_index * self.local_batch
        return self.global_indices(step)[start:start + self.local_batch]

    def local_batch_at(self, step: int) -> dict[str, np.ndarray]:
        return self.rows.read_rows(self.local_indices(step))

    def iterate(self, start_step: int, num_steps: int, read_ahead: int = 2) -> Iterator[dict[str, np.ndarray]]:
        """local_batch_at(step) for step in [start_step, num_steps), the next `read_ahead` steps read
        on one host thread meanwhile (one thread: sources need not be thread-safe; do not call
        local_batch_at while iterating)."""
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="input") as pool:
            pending = [pool.submit(self.local_batch_at, s)
                       for s in range(start_step, min(start_step + read_ahead, num_steps))]
            try:
                for step in range(start_step, num_steps):
                    batch = pending.pop(0).result()
                    if step + read_ahead < num_steps:
                        pending.append(pool.submit(self.local_batch_at, step + read_ahead))
                    yield batch
            finally:  # left early (preemption): what has not started is dropped
                for f in pending:
                    f.cancel()
