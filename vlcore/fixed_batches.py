"""Row-wise functions applied in blocks of one fixed size, so a jitted function compiles once."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np


def fixed_batch_indices(count: int, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """(indices [batch], real) covering range(count) in order, every batch of one size (at most
    `count`): the last is padded by repeating its indices, and `real` says how many leading
    entries count."""
    batch_size = max(1, min(batch_size, count))
    for start in range(0, count, batch_size):
        real = min(batch_size, count - start)
        yield np.resize(np.arange(start, start + real), batch_size), real


def map_fixed_batches(fn: Callable[..., np.ndarray], arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """fn(*blocks) over blocks of exactly `batch_size` rows of `arrays` (the last block padded by
    repeating its last row), the padded outputs dropped and the rest concatenated. `fn` must treat
    rows independently; `arrays` must hold at least one row."""
    n = len(arrays[0])
    out = []
    for start in range(0, n, batch_size):
        blocks = [np.asarray(a[start:start + batch_size]) for a in arrays]
        m = len(blocks[0])
        if m < batch_size:
            blocks = [np.pad(b, [(0, batch_size - m)] + [(0, 0)] * (b.ndim - 1), mode="edge") for b in blocks]
        out.append(np.asarray(fn(*blocks))[:m])
    return np.concatenate(out)
