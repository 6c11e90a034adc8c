"""Datasets written as shards of fixed-shape numpy arrays: atomic, checksummed, memory-mapped.

A shard is a directory `shard-00000/` holding one `.npy` per array (all with the same first
dimension). It is written under a temporary name and renamed, so a shard name on disk is always a
whole shard; its sha256 covers every file's name, size and bytes in a fixed order. Writers that
resume keep the shards they find and write the others; a manifest written last lists them all.
Readers open the arrays with `np.load(mmap_mode="r")`, so the data may exceed RAM.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from vlcore.atomic_files import fsync_path, temp_path

SHARD_RE = re.compile(r"^shard-(\d{5,})$")
_HASH_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    sha256: str


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def shard_sha256(shard_dir: Path, files: Sequence[str]) -> str:
    """sha256 over (name, size, bytes) of `files` in the given order."""
    h = hashlib.sha256()
    for name in files:
        path = Path(shard_dir) / name
        h.update(name.encode("utf-8") + b"\0")
        h.update(str(path.stat().st_size).encode("ascii") + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def write_shard(directory: Path, name: str, arrays: Mapping[str, np.ndarray],
                order: Sequence[str] | None = None) -> ShardInfo:
    """Writes `arrays` (key -> [n, ...]) as `directory/name/<key>.npy`, atomically; the checksum
    covers the files in `order` (keys; sorted keys when None)."""
    counts = {k: len(v) for k, v in arrays.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"shard {name}: arrays of different lengths {counts}")
    final = Path(directory) / name
    if final.exists():
        raise FileExistsError(f"{final}: already exists")
    tmp = temp_path(final)
    tmp.mkdir()
    keys = list(order) if order is not None else sorted(arrays)
    files = [f"{k}.npy" for k in keys]
    try:
        for key, fname in zip(keys, files):
            with open(tmp / fname, "wb") as f:
                np.save(f, np.ascontiguousarray(arrays[key]), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        fsync_path(tmp)
        sha = shard_sha256(tmp, files)
        os.rename(tmp, final)
        fsync_path(Path(directory))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ShardInfo(name, next(iter(counts.values())), sha)


def read_shard(directory: Path, info: ShardInfo, keys: Sequence[str], verify: bool = False) -> dict[str, np.ndarray]:
    """The arrays of one shard, memory-mapped; `verify` checks its sha256 against `info` first."""
    shard = Path(directory) / info.name
    files = [f"{k}.npy" for k in sorted(keys)]
    missing = [f for f in files if not (shard / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{shard}: missing {missing}")
    if verify and shard_sha256(shard, files) != info.sha256:
        raise ValueError(f"{shard}: corrupt (sha256 differs from the manifest)")
    out = {k: np.load(shard / f"{k}.npy", mmap_mode="r", allow_pickle=False) for k in keys}
    lengths = {k: len(v) for k, v in out.items()}
    if set(lengths.values()) != {info.count}:
        raise ValueError(f"{shard}: arrays hold {lengths} rows, the manifest says {info.count}")
    return out


class ConcatenatedRows:
    """Rows of several arrays (e.g. one per shard) addressed as one: `len`, `x[indices]` and `x[i]`,
    reading only the rows asked for (memory-mapped shards stay on disk)."""

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.starts[-1]), *self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self[np.array([index])][0]
        index = np.arange(self.shape[0])[index] if isinstance(index, slice) else np.asarray(index, np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.shape[0]):
            raise IndexError(f"row index out of range [0, {self.shape[0]})")
        part = np.searchsorted(self.starts, index, side="right") - 1
        out = np.empty((len(index), *self.shape[1:]), self.dtype)
        for p in np.unique(part):
            rows = part == p
            out[rows] = self.parts[p][index[rows] - self.starts[p]]
        return out
