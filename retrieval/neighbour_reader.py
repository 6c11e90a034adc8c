"""tf.data reader of precomputed neighbour shards (see ``retrieval/precompute.py`` for the format).

Per-process sharding is by contiguous example range: with ``n`` examples and ``P`` processes,
process ``p`` reads examples ``[p * n // P, (p + 1) * n // P)`` of the file-order stream. The
ranges are disjoint and cover every example; their sizes differ by at most one (so every host of
a multi-host job runs the same number of steps within one batch), and each process reads only
its own slice of the files (plus skipping into the first one), not all of them.

Shuffling (``shuffle_seed`` not None) is seeded and deterministic: the process's file pieces are
shuffled, interleaved record by record, then shuffled through a ``shuffle_buffer``; each epoch of
``repeat=True`` reshuffles (deterministically too). Batches are parsed with one vectorised
``tf.io.parse_example`` call each.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf

from retrieval.backends import RetrievalError
from retrieval.precompute import NEIGHBOUR_KEYS, PrecomputeManifest, file_sha256, load_manifest

__all__ = ["neighbour_dataset", "read_all", "open_manifest"]

_INTERLEAVE_CYCLE = 16  # files read at once when shuffling: more mixing at the cost of open files


def open_manifest(directory: str | os.PathLike, *, verify: bool = False) -> PrecomputeManifest:
    """The manifest, after checking every shard file exists (and its sha256 when ``verify``)."""
    manifest = load_manifest(directory)
    for entry in manifest.shards:
        path = Path(directory) / entry.name
        if not path.is_file():
            raise RetrievalError(f"{path}: shard listed in the manifest is missing")
        if verify:
            actual = file_sha256(path)
            if actual != entry.sha256:
                raise RetrievalError(
                    f"{path}: shard is corrupt (sha256 {actual[:12]}... != manifest {entry.sha256[:12]}...)")
    return manifest


def _process_pieces(manifest: PrecomputeManifest, directory: Path, process_index: int,
                    process_count: int) -> list[tuple[str, int, int]]:
    """(file, records to skip, records to take) covering this process's contiguous example range."""
    n = manifest.n
    lo, hi = process_index * n // process_count, (process_index + 1) * n // process_count
    if hi <= lo:
        raise RetrievalError(
            f"process {process_index} of {process_count} would get no examples ({n} examples in all)")
    pieces, start = [], 0
    for entry in manifest.shards:
        a, b = max(lo, start), min(hi, start + entry.count)
        if a < b:
            pieces.append((str(directory / entry.name), a - start, b - a))
        start += entry.count
    return pieces


def _parser(manifest: PrecomputeManifest, keys: Sequence[str]):
    """A function: serialised Examples [b] -> dict of [b, ...] tensors (only ``keys``)."""
    k, dim, f16 = manifest.k, manifest.dim, manifest.embedding_dtype == "float16"
    spec, shapes = {}, {}
    for name, fs in manifest.field_specs.items():
        if name in keys:
            dtype = tf.float32 if fs.dtype == "float32" else tf.int64
            spec[name] = tf.io.FixedLenFeature([math.prod(fs.shape)] if fs.shape else [], dtype)
            shapes[name] = fs.shape
    if "neighbour_ids" in keys:
        spec["neighbour_ids"] = tf.io.FixedLenFeature([k], tf.int64)
    if "neighbour_scores" in keys:
        spec["neighbour_scores"] = tf.io.FixedLenFeature([k], tf.float32)
    if "neighbour_embeddings" in keys:
        spec["neighbour_embeddings"] = (tf.io.FixedLenFeature([], tf.string) if f16
                                        else tf.io.FixedLenFeature([k * dim], tf.float32))

    def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        ex = tf.io.parse_example(serialized, spec)
        out = {name: tf.reshape(ex[name], [-1, *shapes[name]]) for name in shapes}
        for name in ("neighbour_ids", "neighbour_scores"):
            if name in ex:
                out[name] = ex[name]
        if "neighbour_embeddings" in ex:
            emb = ex["neighbour_embeddings"]
            if f16:
                emb = tf.cast(tf.io.decode_raw(emb, tf.float16, little_endian=True), tf.float32)
            out["neighbour_embeddings"] = tf.reshape(emb, [-1, k, dim])
        return out

    return parse


def neighbour_dataset(
    directory: str | os.PathLike,
    *,
    batch_size: int,
    shuffle_seed: int | None = 0,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool = False,
    drop_remainder: bool = False,
    shuffle_buffer: int = 10000,
    prefetch: bool = True,
    fields: Sequence[str] | None = None,
    verify: bool = False,
) -> tf.data.Dataset:
    """Batches of this process's examples: dicts of tensors.

    Each input field [batch, *shape] (float32 | int64), ``neighbour_ids`` [batch, k] int64,
    ``neighbour_scores`` [batch, k] float32, ``neighbour_embeddings`` [batch, k, dim] float32.
    ``fields`` selects which of these keys to parse (None: all). ``shuffle_seed=None`` keeps
    file order. ``verify`` checks every shard's sha256 against the manifest first.
    """
    directory = Path(directory)
    manifest = open_manifest(directory, verify=verify)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise RetrievalError(f"batch_size: expected a positive int, got {batch_size!r}")
    if not (isinstance(process_count, (int, np.integer)) and process_count >= 1
            and isinstance(process_index, (int, np.integer)) and 0 <= process_index < process_count):
        raise RetrievalError(
            f"process_index={process_index!r}, process_count={process_count!r}: need 0 <= index < count")
    if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, (int, np.integer)) or shuffle_buffer < 1:
        raise RetrievalError(f"shuffle_buffer: expected a positive int, got {shuffle_buffer!r}")
    available = (*sorted(manifest.field_specs), *NEIGHBOUR_KEYS)
    if fields is None:
        keys = available
    else:
        if isinstance(fields, str):
            raise RetrievalError(f"fields: expected a sequence of names, got the string {fields!r}")
        unknown = [f for f in fields if f not in available]
        if unknown:
            raise RetrievalError(f"fields: unknown {unknown}; this precompute has {list(available)}")
        keys = tuple(fields)

    pieces = _process_pieces(manifest, directory, int(process_index), int(process_count))
    files, skips, takes = (list(x) for x in zip(*pieces))
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(files, tf.string), tf.constant(skips, tf.int64), tf.constant(takes, tf.int64)))

    def read(path, skip, take):
        return tf.data.TFRecordDataset(path).skip(skip).take(take)

    if shuffle_seed is None:
        ds = ds.flat_map(read)
    else:
        ds = ds.shuffle(len(pieces), seed=shuffle_seed, reshuffle_each_iteration=True)
        ds = ds.interleave(read, cycle_length=min(len(pieces), _INTERLEAVE_CYCLE), block_length=1,
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
    ds = ds.map(_parser(manifest, keys), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if prefetch:
        ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds


def read_all(directory: str | os.PathLike, *, fields: Sequence[str] | None = None,
             verify: bool = False, batch_size: int = 4096) -> dict[str, np.ndarray]:
    """The whole precompute in file order as numpy arrays ([n, ...] each; see neighbour_dataset)."""
    manifest = open_manifest(directory, verify=verify)
    ds = neighbour_dataset(directory, batch_size=batch_size, shuffle_seed=None, fields=fields)
    try:
        batches = list(ds.as_numpy_iterator())
    except tf.errors.OpError as e:  # a shard that no longer matches its manifest entry
        raise RetrievalError(f"{directory}: unreadable shard ({e.message.splitlines()[0]})") from None
    out = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    got = len(next(iter(out.values())))
    if got != manifest.n:
        raise RetrievalError(f"{directory}: the shards hold {got} examples but the manifest says {manifest.n}")
    return out
