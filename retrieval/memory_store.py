"""Sharded, memory-mapped embedding store for a retrieval memory of image-text pairs.

Layout of a memory directory::

    writer.json            the writer's settings (written first; used to check a resume)
    shard-00000/           one directory per shard, created atomically (temp dir + rename)
        ids.npy            int64 [n]
        emb-image.npy      [n, dim] in the memory's dtype (float32 | float16)
        emb-text.npy
        payload-<name>.npy [n, *shape] (optional, fixed-shape per example)
    shard-00001/ ...
    manifest.json          written last (temp file + os.replace); its presence = finished

Every shard except the last holds exactly ``shard_size`` rows, so the layout (and every shard's
checksum) depends only on the input sequence, not on where writing was interrupted and resumed.
Each local ``.npy`` is opened with ``np.load(..., mmap_mode="r")`` so the memory may exceed RAM.

The directory may be on any filesystem of `vlcore.fs` (gs://, ram://). There, shards are written
file by file in place (`vlcore.array_shards`), a resumed writer drops a trailing shard that lacks
files, and `MemoryStore.open` reads every ``.npy`` into memory (no memory map over a network
filesystem): such a memory must fit in host RAM.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from vlcore import fs
from vlcore.errors import InputError
from vlcore.array_shards import load_npy, npy_header, shard_sha256, write_shard
from vlcore.atomic_files import TMP_PREFIX, atomic_write_json, differing_keys

__all__ = [
    "MemoryStoreError",
    "ShardInfo",
    "Manifest",
    "MemoryWriter",
    "MemoryStore",
    "MANIFEST_NAME",
    "WRITER_NAME",
]

MANIFEST_NAME = "manifest.json"
WRITER_NAME = "writer.json"
FORMAT_VERSION = 1
NORM_TOLERANCE = 1e-3
_SHARD_RE = re.compile(r"^shard-(\d{5,})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_DTYPES = ("float32", "float16")


class MemoryStoreError(InputError):
    """Any invalid input, configuration or on-disk state of a memory store."""


# --------------------------------------------------------------------------------------------
# Manifest


def settings_json(source: Any, payload: Sequence[tuple[str, tuple[int, ...], str]]) -> dict[str, Any]:
    """The memory's settings as JSON: what writer.json records and the manifest repeats."""
    return {
        "format_version": FORMAT_VERSION,
        "encoder_fingerprint": source.encoder_fingerprint,
        "dim": source.dim,
        "dtype": source.dtype,
        "normalized": source.normalized,
        "modalities": list(source.modalities),
        "shard_size": source.shard_size,
        "payload": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in payload],
    }


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    encoder_fingerprint: str
    dim: int
    dtype: str
    normalized: bool
    modalities: tuple[str, ...]
    count: int
    shards: tuple[ShardInfo, ...]
    # (name, shape, dtype) per payload array, sorted by name.
    payload: tuple[tuple[str, tuple[int, ...], str], ...] = ()
    shard_size: int = 0

    def to_json_dict(self) -> dict[str, Any]:
        return {
            **settings_json(self, self.payload),
            "count": self.count,
            "shards": [
                {"name": s.name, "count": s.count, "sha256": s.sha256} for s in self.shards
            ],
        }

    def canonical_json(self) -> str:
        return json.dumps(self.to_json_dict(), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: identifies this exact memory (config + shard checksums)."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    @classmethod
    def from_json_dict(cls, d: Any, where: str = MANIFEST_NAME) -> "Manifest":
        def fail(msg: str) -> MemoryStoreError:
            return MemoryStoreError(f"{where}: {msg}")

        if not isinstance(d, dict):
            raise fail("expected a JSON object")
        if d.get("format_version") != FORMAT_VERSION:
            raise fail(f"format_version is {d.get('format_version')!r}, expected {FORMAT_VERSION}")
        try:
            fp = d["encoder_fingerprint"]
            dim = d["dim"]
            dtype = d["dtype"]
            normalized = d["normalized"]
            modalities = d["modalities"]
            count = d["count"]
            shard_size = d.get("shard_size", 0)
            payload = d.get("payload", [])
            shards = d["shards"]
        except KeyError as e:
            raise fail(f"missing field {e.args[0]!r}") from None
        if not isinstance(fp, str):
            raise fail("field 'encoder_fingerprint' must be a string")
        if not _is_int(dim) or dim <= 0:
            raise fail(f"field 'dim' must be a positive int, got {dim!r}")
        if dtype not in _DTYPES:
            raise fail(f"field 'dtype' must be one of {_DTYPES}, got {dtype!r}")
        if not isinstance(normalized, bool):
            raise fail("field 'normalized' must be a bool")
        if (not isinstance(modalities, list) or not modalities
                or not all(isinstance(m, str) and _NAME_RE.match(m) for m in modalities)
                or len(set(modalities)) != len(modalities)):
            raise fail(f"field 'modalities' must be a non-empty list of unique names, got {modalities!r}")
        if not _is_int(count) or count < 0:
            raise fail(f"field 'count' must be a non-negative int, got {count!r}")
        if not _is_int(shard_size) or shard_size < 0:
            raise fail(f"field 'shard_size' must be a non-negative int, got {shard_size!r}")
        if not isinstance(payload, list):
            raise fail("field 'payload' must be a list")
        pl = []
        for p in payload:
            try:
                name, shape, pdt = p["name"], p["shape"], p["dtype"]
                np.dtype(pdt)
            except (KeyError, TypeError) as e:
                raise fail(f"bad payload entry {p!r}: {e}") from None
            if (not isinstance(name, str) or not _NAME_RE.match(name) or not isinstance(shape, list)
                    or not all(_is_int(x) and x >= 0 for x in shape)):
                raise fail(f"bad payload entry {p!r}")
            pl.append((name, tuple(int(x) for x in shape), str(np.dtype(pdt))))
        if not isinstance(shards, list):
            raise fail("field 'shards' must be a list")
        infos = []
        for s in shards:
            if (not isinstance(s, dict) or not isinstance(s.get("name"), str)
                    or not _SHARD_RE.match(s["name"]) or not _is_int(s.get("count"))
                    or s["count"] < 0 or not isinstance(s.get("sha256"), str)):
                raise fail(f"bad shard entry {s!r}")
            infos.append(ShardInfo(s["name"], int(s["count"]), s["sha256"]))
        if len({s.name for s in infos}) != len(infos):
            raise fail("duplicate shard names")
        total = sum(s.count for s in infos)
        if total != count:
            raise fail(f"field 'count' is {count} but the shards hold {total} rows")
        return cls(
            encoder_fingerprint=fp, dim=int(dim), dtype=dtype, normalized=normalized,
            modalities=tuple(modalities), count=int(count), shards=tuple(infos),
            payload=tuple(sorted(pl)), shard_size=int(shard_size),
        )


# --------------------------------------------------------------------------------------------
# helpers


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def _shard_files(modalities: Sequence[str], payload_names: Sequence[str]) -> list[str]:
    """The files of a shard in the fixed order used for its checksum."""
    return (["ids.npy"] + [f"emb-{m}.npy" for m in modalities]
            + [f"payload-{n}.npy" for n in sorted(payload_names)])


def _read_json(path: str) -> Any:
    if not fs.isfile(path):
        raise MemoryStoreError(f"{path}: missing")
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MemoryStoreError(f"{path}: corrupt JSON ({e})") from None


def _load_npy(path: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The array (memory-mapped when local, in memory otherwise), checked against shape and dtype."""
    try:
        arr = load_npy(path)
    except FileNotFoundError:
        raise MemoryStoreError(f"{path}: missing") from None
    except (ValueError, OSError) as e:
        raise MemoryStoreError(f"{path}: unreadable .npy ({e})") from None
    if arr.shape != shape or arr.dtype != dtype:
        raise MemoryStoreError(
            f"{path}: expected shape {shape} dtype {dtype}, found shape {arr.shape} dtype {arr.dtype}")
    return arr


def _normalize_payload_spec(spec: Mapping[str, Any] | None) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    if spec is None:
        return ()
    if not isinstance(spec, Mapping):
        raise MemoryStoreError(f"payload_spec: expected a dict name -> (shape, dtype), got {type(spec).__name__}")
    out = []
    for name, v in spec.items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise MemoryStoreError(f"payload_spec: bad payload name {name!r}")
        try:
            shape, dt = v
            shape = tuple(int(x) for x in shape)
            dt = str(np.dtype(dt))
        except (TypeError, ValueError) as e:
            raise MemoryStoreError(f"payload_spec[{name!r}]: expected (shape, dtype), got {v!r} ({e})") from None
        if any(x < 0 for x in shape) or np.dtype(dt).hasobject:
            raise MemoryStoreError(f"payload_spec[{name!r}]: bad shape/dtype {v!r}")
        out.append((name, shape, dt))
    return tuple(sorted(out))


# --------------------------------------------------------------------------------------------
# writer


class MemoryWriter:
    """Writes a memory as fixed-size shards; resumable after a crash (see module docstring).

    ``num_written`` is the number of examples already durably stored when the writer was opened
    on a partially written directory; the caller must skip that many inputs (it writes in a
    deterministic order) and continue with ``add``.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        encoder_fingerprint: str,
        dim: int,
        modalities: Sequence[str] = ("image", "text"),
        dtype: str = "float32",
        shard_size: int = 65536,
        payload_spec: Mapping[str, Any] | None = None,
        normalized: bool = True,
        overwrite: bool = False,
    ):
        if not isinstance(encoder_fingerprint, str) or not encoder_fingerprint:
            raise MemoryStoreError("encoder_fingerprint: expected a non-empty string")
        if not _is_int(dim) and not isinstance(dim, np.integer) or int(dim) <= 0:
            raise MemoryStoreError(f"dim: expected a positive int, got {dim!r}")
        if isinstance(modalities, str):
            raise MemoryStoreError(f"modalities: expected a sequence of names, got the string {modalities!r}")
        modalities = tuple(modalities)
        if (not modalities or len(set(modalities)) != len(modalities)
                or not all(isinstance(m, str) and _NAME_RE.match(m) for m in modalities)):
            raise MemoryStoreError(f"modalities: expected non-empty unique names, got {modalities!r}")
        try:
            dtype = str(np.dtype(dtype))
        except TypeError:
            raise MemoryStoreError(f"dtype: expected one of {_DTYPES}, got {dtype!r}") from None
        if dtype not in _DTYPES:
            raise MemoryStoreError(f"dtype: expected one of {_DTYPES}, got {dtype!r}")
        if not _is_int(shard_size) and not isinstance(shard_size, np.integer) or int(shard_size) <= 0:
            raise MemoryStoreError(f"shard_size: expected a positive int, got {shard_size!r}")

        self.directory = fs.fspath(directory)
        self.encoder_fingerprint = encoder_fingerprint
        self.dim = int(dim)
        self.modalities = modalities
        self.dtype = dtype
        self.shard_size = int(shard_size)
        self.payload_spec = _normalize_payload_spec(payload_spec)
        self.normalized = bool(normalized)
        self._payload_names = tuple(n for n, _, _ in self.payload_spec)
        self._files = _shard_files(self.modalities, self._payload_names)

        self._shards: list[ShardInfo] = []
        self._seen_ids: set[int] = set()
        self._buffer: list[dict[str, np.ndarray]] = []
        self._buffered = 0
        self._closed = False

        fs.makedirs(self.directory)
        manifest_path = fs.join(self.directory, MANIFEST_NAME)
        if overwrite:
            self._wipe()
        elif fs.exists(manifest_path):
            raise MemoryStoreError(
                f"{manifest_path}: memory is already finished; pass overwrite=True to rewrite it")
        self._remove_temps()
        self._resume_or_start()
        self.num_written = sum(s.count for s in self._shards)

    # -- settings / resume ------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return settings_json(self, self.payload_spec)

    def _existing_shard_dirs(self) -> list[tuple[int, str]]:
        out = []
        for name in fs.listdir(self.directory):
            m = _SHARD_RE.match(name)
            if m and fs.isdir(fs.join(self.directory, name)):
                out.append((int(m.group(1)), fs.join(self.directory, name)))
        return sorted(out)

    def _remove_where(self, doomed) -> None:
        """Deletes every file or directory of the store whose name `doomed(name)` accepts."""
        for name in fs.listdir(self.directory):
            if doomed(name):
                path = fs.join(self.directory, name)
                if fs.isdir(path):
                    fs.rmtree(path)
                else:
                    fs.remove(path)

    def _wipe(self) -> None:
        self._remove_where(lambda name: name in (MANIFEST_NAME, WRITER_NAME) or bool(_SHARD_RE.match(name))
                           or name.startswith(TMP_PREFIX))

    def _remove_temps(self) -> None:
        self._remove_where(lambda name: name.startswith(TMP_PREFIX))

    def _resume_or_start(self) -> None:
        writer_path = fs.join(self.directory, WRITER_NAME)
        shards = self._existing_shard_dirs()
        settings = self._settings()
        if fs.exists(writer_path):
            diff = differing_keys(_read_json(writer_path), settings)
            if diff:
                raise MemoryStoreError(
                    f"{writer_path}: existing memory was written with different settings "
                    f"(differs in {', '.join(diff)}); use the same settings to resume or overwrite=True")
        elif shards:
            raise MemoryStoreError(
                f"{writer_path}: missing, but {len(shards)} shard(s) exist; cannot resume (use overwrite=True)")
        else:
            atomic_write_json(writer_path, settings)
            return

        # Resume: shards must be shard-00000 .. shard-(k-1), each full.  A trailing partial shard
        # (close() crashed before the manifest), or one missing files (written in place on an object
        # store and interrupted), is dropped so the caller re-adds its rows.
        for expected, (idx, path) in enumerate(shards):
            if idx != expected:
                raise MemoryStoreError(f"{path}: expected {_shard_name(expected)} (shards must be contiguous)")
        for i, (_, path) in enumerate(shards):
            last = i == len(shards) - 1
            if last and not all(fs.isfile(fs.join(path, f)) for f in self._files):
                fs.rmtree(path)
                break
            ids_path = fs.join(path, "ids.npy")
            ids = _load_npy(ids_path, _shape_of(ids_path), np.dtype(np.int64))
            n = ids.shape[0]
            if n != self.shard_size:
                if last and 0 < n < self.shard_size:
                    fs.rmtree(path)
                    break
                raise MemoryStoreError(f"{path}: holds {n} rows, expected shard_size {self.shard_size}")
            self._check_shard_files(path, n)
            for v in np.asarray(ids).tolist():
                if v in self._seen_ids:
                    raise MemoryStoreError(f"{ids_path}: duplicate id {v}")
                self._seen_ids.add(v)
            self._shards.append(ShardInfo(fs.basename(path), n, shard_sha256(path, self._files)))

    def _check_shard_files(self, path: str, n: int) -> None:
        for m in self.modalities:
            _check_npy(fs.join(path, f"emb-{m}.npy"), (n, self.dim), np.dtype(self.dtype))
        for name, shape, dt in self.payload_spec:
            _check_npy(fs.join(path, f"payload-{name}.npy"), (n, *shape), np.dtype(dt))

    # -- adding -----------------------------------------------------------------------------

    def add(
        self,
        ids: Any,
        embeddings: Mapping[str, Any],
        payload: Mapping[str, Any] | None = None,
    ) -> None:
        """Validates a batch completely, buffers it and writes every full shard."""
        if self._closed:
            raise MemoryStoreError(f"{self.directory}: writer is closed")
        batch = self._validate(ids, embeddings, payload)
        b = batch["ids"].shape[0]
        if b == 0:
            return
        self._seen_ids.update(batch["ids"].tolist())
        self._buffer.append(batch)
        self._buffered += b
        if self._buffered >= self.shard_size:
            merged = {k: np.concatenate([c[k] for c in self._buffer]) for k in self._buffer[0]}
            start = 0
            total = self._buffered
            while total - start >= self.shard_size:
                self._write_shard({k: v[start:start + self.shard_size] for k, v in merged.items()})
                start += self.shard_size
            rest = {k: v[start:].copy() for k, v in merged.items()}
            self._buffer = [rest] if total - start else []
            self._buffered = total - start

    def _validate(self, ids: Any, embeddings: Mapping[str, Any], payload: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
        ids_arr = np.asarray(ids)
        if ids_arr.ndim != 1:
            raise MemoryStoreError(f"ids: expected a 1-D int64 array, got shape {ids_arr.shape}")
        if ids_arr.size == 0 and ids_arr.dtype.kind == "f":
            ids_arr = ids_arr.astype(np.int64)
        if ids_arr.dtype.kind not in "iu":
            raise MemoryStoreError(f"ids: expected an integer array, got dtype {ids_arr.dtype}")
        if ids_arr.dtype.kind == "u" and ids_arr.size and int(ids_arr.max()) > np.iinfo(np.int64).max:
            raise MemoryStoreError("ids: values exceed the int64 range")
        ids_arr = ids_arr.astype(np.int64)
        b = ids_arr.shape[0]
        ids_list = ids_arr.tolist()
        if len(set(ids_list)) != b:
            uniq, counts = np.unique(ids_arr, return_counts=True)
            raise MemoryStoreError(f"ids: duplicate id {int(uniq[counts > 1][0])} within the batch")
        for v in ids_list:
            if v in self._seen_ids:
                raise MemoryStoreError(f"ids: duplicate id {v} (already added to this memory)")

        if not isinstance(embeddings, Mapping):
            raise MemoryStoreError(f"embeddings: expected a dict modality -> [b, dim] array, got {type(embeddings).__name__}")
        if set(embeddings) != set(self.modalities):
            raise MemoryStoreError(
                f"embeddings: modality set {sorted(embeddings)} != expected {sorted(self.modalities)}")
        out: dict[str, np.ndarray] = {"ids": ids_arr}
        for m in self.modalities:
            e = np.asarray(embeddings[m])
            if e.ndim != 2 or e.shape[1] != self.dim:
                raise MemoryStoreError(
                    f"embeddings[{m!r}]: expected shape [b, dim={self.dim}], got {e.shape}")
            if e.shape[0] != b:
                raise MemoryStoreError(
                    f"embeddings[{m!r}]: batch size {e.shape[0]} != {b} ids")
            if e.dtype.kind not in "fiu":
                raise MemoryStoreError(f"embeddings[{m!r}]: expected a float array, got dtype {e.dtype}")
            if b == 0:
                out[f"emb-{m}"] = e.astype(self.dtype)
                continue
            finite = np.isfinite(e).all(axis=1)
            if not finite.all():
                row = int(np.argmin(finite))
                raise MemoryStoreError(
                    f"embeddings[{m!r}]: non-finite value (NaN/inf) in row {row} (id {ids_list[row]})")
            if self.normalized:
                norms = np.linalg.norm(e.astype(np.float64), axis=1)
                bad = np.abs(norms - 1.0) > NORM_TOLERANCE
                if bad.any():
                    row = int(np.argmax(bad))
                    raise MemoryStoreError(
                        f"embeddings[{m!r}]: row {row} (id {ids_list[row]}) has L2 norm {norms[row]:.6g}, "
                        f"expected 1 within {NORM_TOLERANCE}")
            stored = e.astype(self.dtype)
            if not np.isfinite(stored).all():
                raise MemoryStoreError(f"embeddings[{m!r}]: values overflow {self.dtype}")
            out[f"emb-{m}"] = stored

        payload = {} if payload is None else payload
        if not isinstance(payload, Mapping):
            raise MemoryStoreError(f"payload: expected a dict name -> array, got {type(payload).__name__}")
        if set(payload) != set(self._payload_names):
            raise MemoryStoreError(
                f"payload: names {sorted(payload)} != payload_spec {sorted(self._payload_names)}")
        for name, shape, dt in self.payload_spec:
            p = np.asarray(payload[name])
            if p.shape != (b, *shape):
                raise MemoryStoreError(f"payload[{name!r}]: expected shape {(b, *shape)}, got {p.shape}")
            if not np.can_cast(p.dtype, dt, casting="same_kind"):
                raise MemoryStoreError(f"payload[{name!r}]: dtype {p.dtype} cannot be stored as {dt}")
            out[f"payload-{name}"] = p.astype(dt)
        return out

    def _write_shard(self, arrays: Mapping[str, np.ndarray]) -> None:
        name = _shard_name(len(self._shards))
        if fs.exists(fs.join(self.directory, name)):
            raise MemoryStoreError(f"{fs.join(self.directory, name)}: already exists")
        info = write_shard(self.directory, name, arrays, order=[f[:-len(".npy")] for f in self._files])
        self._shards.append(ShardInfo(name, info.count, info.sha256))

    # -- finishing --------------------------------------------------------------------------

    def close(self) -> Manifest:
        """Writes the last partial shard and then ``manifest.json``; returns the manifest."""
        if self._closed:
            raise MemoryStoreError(f"{self.directory}: writer is already closed")
        if self._buffered:
            merged = {k: np.concatenate([c[k] for c in self._buffer]) for k in self._buffer[0]}
            self._write_shard(merged)
            self._buffer, self._buffered = [], 0
        manifest = Manifest(
            encoder_fingerprint=self.encoder_fingerprint, dim=self.dim, dtype=self.dtype,
            normalized=self.normalized, modalities=self.modalities,
            count=sum(s.count for s in self._shards), shards=tuple(self._shards),
            payload=self.payload_spec, shard_size=self.shard_size,
        )
        atomic_write_json(fs.join(self.directory, MANIFEST_NAME), manifest.to_json_dict())
        self._closed = True
        return manifest

    @property
    def count(self) -> int:
        """Rows added so far (stored shards + buffered)."""
        return sum(s.count for s in self._shards) + self._buffered

    def __enter__(self) -> "MemoryWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an exception, leave the complete shards in place so writing can be resumed.
        if exc_type is None and not self._closed:
            self.close()


def _shape_of(path: str) -> tuple[int, ...]:
    return _npy_header(path)[0]


def _npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    if not fs.isfile(path):
        raise MemoryStoreError(f"{path}: missing")
    try:
        return npy_header(path)
    except (ValueError, OSError) as e:
        raise MemoryStoreError(f"{path}: unreadable .npy ({e})") from None


def _check_npy(path: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Checks a .npy's shape, dtype and length without reading its data: a memory map locally, the
    header and size elsewhere (where loading would download the whole file)."""
    if fs.is_local(path):
        _load_npy(path, shape, dtype)
        return
    got_shape, got_dtype, offset = _npy_header(path)
    if got_shape != shape or got_dtype != dtype:
        raise MemoryStoreError(
            f"{path}: expected shape {shape} dtype {dtype}, found shape {got_shape} dtype {got_dtype}")
    if fs.size(path) != offset + int(np.prod(shape)) * dtype.itemsize:
        raise MemoryStoreError(f"{path}: unreadable .npy (its size does not match its header)")


# --------------------------------------------------------------------------------------------
# reader


class MemoryStore:
    """A finished memory, opened read-only with memory-mapped shard arrays."""

    def __init__(self, directory: str, manifest: Manifest, shards: list[dict[str, np.ndarray]]):
        self.directory = directory
        self._manifest = manifest
        self._shards = shards

    @classmethod
    def open(cls, directory: str | os.PathLike, *, verify: bool = True) -> "MemoryStore":
        """The finished memory at `directory`; `verify` checks every shard's sha256 first."""
        directory = fs.fspath(directory)
        manifest_path = fs.join(directory, MANIFEST_NAME)
        manifest = Manifest.from_json_dict(_read_json(manifest_path), where=manifest_path)
        if manifest.count == 0 or not manifest.shards:
            raise MemoryStoreError(f"{manifest_path}: empty memory (count 0)")
        payload_names = [n for n, _, _ in manifest.payload]
        files = _shard_files(manifest.modalities, payload_names)
        shards = []
        for info in manifest.shards:
            sdir = fs.join(directory, info.name)
            if not fs.isdir(sdir):
                raise MemoryStoreError(f"{sdir}: shard {info.name} missing")
            for f in files:
                if not fs.isfile(fs.join(sdir, f)):
                    raise MemoryStoreError(f"{fs.join(sdir, f)}: file of shard {info.name} missing")
            if verify:
                actual = shard_sha256(sdir, files)
                if actual != info.sha256:
                    raise MemoryStoreError(
                        f"{sdir}: shard {info.name} is corrupt (sha256 {actual[:12]}... != manifest {info.sha256[:12]}...)")
            n = info.count
            arrays = {"ids": _load_npy(fs.join(sdir, "ids.npy"), (n,), np.dtype(np.int64))}
            for m in manifest.modalities:
                arrays[f"emb-{m}"] = _load_npy(fs.join(sdir, f"emb-{m}.npy"), (n, manifest.dim),
                                               np.dtype(manifest.dtype))
            for name, shape, dt in manifest.payload:
                arrays[f"payload-{name}"] = _load_npy(fs.join(sdir, f"payload-{name}.npy"), (n, *shape), np.dtype(dt))
            shards.append(arrays)
        return cls(directory, manifest, shards)

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def count(self) -> int:
        return self._manifest.count

    @property
    def dim(self) -> int:
        return self._manifest.dim

    @property
    def modalities(self) -> tuple[str, ...]:
        return self._manifest.modalities

    def fingerprint(self) -> str:
        return self._manifest.fingerprint()

    def _check_modality(self, modality: str) -> None:
        if modality not in self._manifest.modalities:
            raise MemoryStoreError(
                f"modality: {modality!r} is not in this memory (has {list(self._manifest.modalities)})")

    def shard_arrays(self, modality: str) -> list[np.memmap]:
        """[n_shard, dim] embedding arrays (memory-mapped when local), one per shard, in order."""
        self._check_modality(modality)
        return [s[f"emb-{modality}"] for s in self._shards]

    def shard_ids(self) -> list[np.memmap]:
        return [s["ids"] for s in self._shards]

    def ids(self) -> np.ndarray:
        return np.concatenate([np.asarray(s["ids"]) for s in self._shards]).astype(np.int64, copy=False)

    @functools.cached_property
    def _ids_sorted(self) -> tuple[np.ndarray, np.ndarray]:
        """(all ids, their argsort), built once: every id lookup reuses it."""
        ids = self.ids()
        return ids, np.argsort(ids, kind="stable")

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Global row positions of memory ids (same shape); unknown ids raise MemoryStoreError."""
        all_ids, order = self._ids_sorted
        flat = np.asarray(ids, np.int64).reshape(-1)
        rows = order[np.minimum(np.searchsorted(all_ids, flat, sorter=order), len(all_ids) - 1)]
        unknown = all_ids[rows] != flat
        if unknown.any():
            raise MemoryStoreError(f"ids {flat[unknown][:5].tolist()} are not in the memory")
        return rows.reshape(np.shape(ids))

    def embeddings(self, modality: str) -> np.ndarray:
        """All rows as one float32 [n, dim] array in RAM (only for memories that fit)."""
        self._check_modality(modality)
        return np.concatenate([np.asarray(s[f"emb-{modality}"], dtype=np.float32) for s in self._shards])

    def iter_shards(self, modality: str) -> Iterator[tuple[np.ndarray, np.memmap]]:
        """Yields ``(ids, embeddings_memmap)`` per shard, for building indexes shard by shard."""
        self._check_modality(modality)
        for s in self._shards:
            yield np.asarray(s["ids"]), s[f"emb-{modality}"]

    def payload(self, name: str) -> np.ndarray:
        names = [n for n, _, _ in self._manifest.payload]
        if name not in names:
            raise MemoryStoreError(f"payload: {name!r} is not in this memory (has {names})")
        return np.concatenate([np.asarray(s[f"payload-{name}"]) for s in self._shards])

    def __len__(self) -> int:
        return self.count
