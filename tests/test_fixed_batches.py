"""`vlcore.fixed_batches`: every block has one size (one compiled program), every row once, in order."""

from __future__ import annotations

import numpy as np

from vlcore.fixed_batches import fixed_batch_indices, map_fixed_batches


def test_fixed_batch_indices_cover_every_index_once_at_one_shape():
    seen = []
    for index, real in fixed_batch_indices(10, 4):
        assert index.shape == (4,)
        seen.extend(index[:real].tolist())
    assert seen == list(range(10))
    assert [real for _, real in fixed_batch_indices(3, 8)] == [3]  # never wider than the work
    assert list(fixed_batch_indices(0, 8)) == []


def test_map_fixed_batches_equals_the_function_on_all_rows():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((11, 3)), rng.standard_normal((11, 3))
    sizes = []

    def fn(x, y):
        sizes.append(len(x))
        return x * 2 + y

    np.testing.assert_array_equal(map_fixed_batches(fn, [a, b], 4), a * 2 + b)
    assert sizes == [4, 4, 4]
