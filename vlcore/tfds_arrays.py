"""Whole TFDS splits as host numpy arrays, for data small enough to hold (or memory-map)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds


def split_arrays(builder: tfds.core.DatasetBuilder, split: str, keys: Sequence[str],
                 batch_size: int = 1024) -> dict[str, np.ndarray]:
    """{key: array [num_examples, ...]} of fixed-shape features; text features become str arrays."""
    features = builder.info.features
    missing = [k for k in keys if k not in features]
    if missing:
        raise KeyError(f"{builder.name}: no feature(s) {missing}; available: {sorted(features.keys())}")
    if split not in builder.info.splits:
        raise KeyError(f"{builder.name}: no split {split!r}; available: {sorted(builder.info.splits.keys())}")
    ds = builder.as_dataset(split=split, shuffle_files=False)
    ds = ds.map(lambda ex: {k: ex[k] for k in keys}, num_parallel_calls=tf.data.AUTOTUNE)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for batch in tfds.as_numpy(ds.batch(batch_size).prefetch(2)):
        for k in keys:
            parts[k].append(batch[k])
    out = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in parts.items()}
    for k, v in out.items():
        if v.dtype == object:  # tf.string -> Python str
            out[k] = np.array([s.decode("utf-8") for s in v], dtype=object)
    return out
