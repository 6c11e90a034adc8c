"""Deterministic, resumable batch order: the examples of step s depend only on (seed, s).

Each epoch is a permutation drawn from (seed, epoch); step s takes the s-th slice of the
concatenated permutations, and process p takes its contiguous part of that global batch. A run
resumed at step s therefore sees exactly the examples the uninterrupted run saw from step s on.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

from vlcore.training.config_check import ConfigError


class StepIndexedBatches:
    """Batches of in-memory (or memory-mapped) arrays, indexed by training step."""

    def __init__(self, arrays: Mapping[str, np.ndarray], global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"input arrays have different lengths: {sizes}")
        self.num_examples = next(iter(sizes.values()))
        if global_batch > self.num_examples:
            raise ConfigError(f"config.batch_size {global_batch} exceeds the {self.num_examples} training examples")
        if global_batch % process_count:
            raise ConfigError(f"config.batch_size {global_batch} is not divisible by the process count {process_count}")
        self.arrays = dict(arrays)
        self.global_batch, self.seed = global_batch, seed
        self.local_batch = global_batch // process_count
        self.process_index = process_index
        self.steps_per_epoch = self.num_examples // global_batch  # the remainder of an epoch is dropped

    def global_indices(self, step: int) -> np.ndarray:
        epoch, offset = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        return order[offset * self.global_batch:(offset + 1) * self.global_batch]

    def local_batch_at(self, step: int) -> dict[str, np.ndarray]:
        index = self.global_indices(step)
        start = self.process_index * self.local_batch
        index = index[start:start + self.local_batch]
        return {k: v[index] for k, v in self.arrays.items()}

    def iterate(self, start_step: int, num_steps: int) -> Iterator[dict[str, np.ndarray]]:
        for step in range(start_step, num_steps):
            yield self.local_batch_at(step)
