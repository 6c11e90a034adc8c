"""Datasets written as shards of fixed-shape numpy arrays: atomic, checksummed, memory-mapped.

A shard is a directory `shard-00000/` holding one `.npy` per array (all with the same first
dimension). It is written under a temporary name and renamed, so a shard name on disk is always a
whole shard; its sha256 covers every file's name, size and bytes in a fixed order. Writers that
resume keep the shards they find and write the others; a manifest written last lists them all.
Readers open local arrays with `np.load(mmap_mode="r")`, so the data may exceed RAM.

On an object store (gs://, ram://; see `vlcore.fs`) a directory cannot be renamed atomically, so
a shard's files are written in place, each one atomically: a crash can leave a shard directory
without some of its files, which only the manifest (written last) tells from a whole one. Arrays
there are read into memory (no memory map over a network filesystem).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import re
import shutil
from typing import Mapping, Sequence

import numpy as np

from vlcore import fs

SHARD_RE = re.compile(r"^shard-(\d{5,})$")
_HASH_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    sha256: str


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def shard_sha256(shard_dir: str | os.PathLike, files: Sequence[str]) -> str:
    """sha256 over (name, size, bytes) of `files` in the given order."""
    h = hashlib.sha256()
    for name in files:
        path = fs.join(shard_dir, name)
        h.update(name.encode("utf-8") + b"\0")
        h.update(str(fs.size(path)).encode("ascii") + b"\0")
        with fs.open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def load_npy(path: str | os.PathLike) -> np.ndarray:
    """A .npy file: memory-mapped when local, read into memory otherwise (FileNotFoundError if missing)."""
    path = fs.fspath(path)
    if fs.is_local(path):
        return np.load(path, mmap_mode="r", allow_pickle=False)
    if not fs.isfile(path):
        raise FileNotFoundError(path)
    return np.load(io.BytesIO(fs.read_bytes(path)), allow_pickle=False)


def npy_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a .npy file from its header only; ValueError if
    it is not one."""
    with fs.open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                           else np.lib.format.read_array_header_2_0(f))
        return tuple(shape), dtype, f.tell()


def write_shard(directory: str | os.PathLike, name: str, arrays: Mapping[str, np.ndarray],
                order: Sequence[str] | None = None) -> ShardInfo:
    """Writes `arrays` (key -> [n, ...]) as `directory/name/<key>.npy`, atomically (in place, file
    by file, on object stores); the checksum covers the files in `order` (keys; sorted keys when None)."""
    counts = {k: len(v) for k, v in arrays.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"shard {name}: arrays of different lengths {counts}")
    final = fs.join(directory, name)
    if fs.exists(final):
        raise FileExistsError(f"{final}: already exists")
    keys = list(order) if order is not None else sorted(arrays)
    files = [f"{k}.npy" for k in keys]
    count = next(iter(counts.values()))
    if not fs.is_local(final):
        return ShardInfo(name, count, _write_files_in_place(final, keys, files, arrays))
    tmp = fs.temp_path(final)
    os.mkdir(tmp)
    try:
        for key, fname in zip(keys, files):
            with open(os.path.join(tmp, fname), "wb") as f:
                np.save(f, np.ascontiguousarray(arrays[key]), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        fs.fsync_path(tmp)
        sha = shard_sha256(tmp, files)
        os.rename(tmp, final)
        fs.fsync_path(fs.fspath(directory))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ShardInfo(name, count, sha)


def _write_files_in_place(final: str, keys: Sequence[str], files: Sequence[str],
                          arrays: Mapping[str, np.ndarray]) -> str:
    """A shard on an object store: each file written atomically into `final`; the same sha256 as
    `shard_sha256`, computed from the bytes written."""
    fs.makedirs(final)
    h = hashlib.sha256()
    try:
        for key, fname in zip(keys, files):
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            data = buf.getvalue()
            fs.write_bytes(fs.join(final, fname), data)
            h.update(fname.encode("utf-8") + b"\0")
            h.update(str(len(data)).encode("ascii") + b"\0")
            h.update(data)
    except BaseException:
        with contextlib.suppress(Exception):  # best effort; after a crash the manifest does not list it
            fs.rmtree(final)
        raise
    return h.hexdigest()


def read_shard(directory: str | os.PathLike, info: ShardInfo, keys: Sequence[str],
               verify: bool = False) -> dict[str, np.ndarray]:
    """The arrays of one shard (memory-mapped when local); `verify` checks its sha256 against `info` first."""
    shard = fs.join(directory, info.name)
    files = [f"{k}.npy" for k in sorted(keys)]
    missing = [f for f in files if not fs.isfile(fs.join(shard, f))]
    if missing:
        raise FileNotFoundError(f"{shard}: missing {missing}")
    if verify and shard_sha256(shard, files) != info.sha256:
        raise ValueError(f"{shard}: corrupt (sha256 differs from the manifest)")
    out = {k: load_npy(fs.join(shard, f"{k}.npy")) for k in keys}
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
