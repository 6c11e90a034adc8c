"""The `Index` interface every backend implements, its input checks, and the backend-agnostic
helpers `recall_at_k` and `search_excluding`."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np

from retrieval.errors import RetrievalError
from vlcore import fs

META = "index_meta.json"


# --------------------------------------------------------------------------- validation helpers


def check_embeddings(x: Any, what: str, d: int | None = None) -> np.ndarray:
    """``x`` as a C-contiguous float32 [n, d] array, or RetrievalError naming what is wrong."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise RetrievalError(f"{what} must be a 2-D [n, d] array, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise RetrievalError(f"{what} is empty (0 rows)")
    if arr.shape[1] == 0:
        raise RetrievalError(f"{what} has dimension 0")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise RetrievalError(f"{what} must be real floats, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise RetrievalError(f"{what} contain NaN or inf values")
    if d is not None and arr.shape[1] != d:
        raise RetrievalError(f"{what} dimension mismatch: got d={arr.shape[1]}, memory has d={d}")
    return arr


def check_ids(ids: Any, n: int, existing: np.ndarray | None = None) -> np.ndarray:
    """``ids`` [n] as int64, unique and not in ``existing``; None -> the next n free integers."""
    if ids is None:
        start = 0 if existing is None or existing.size == 0 else int(existing.max()) + 1
        return np.arange(start, start + n, dtype=np.int64)
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise RetrievalError(f"ids have wrong length/shape {arr.shape}, expected ({n},)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise RetrievalError(f"ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if np.unique(arr).size != n:
        raise RetrievalError("ids are not unique")
    if existing is not None and np.isin(arr, existing).any():
        raise RetrievalError("ids are not unique: some ids are already in the index")
    return arr


def check_k(k: Any, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise RetrievalError(f"k must be an int, got {type(k).__name__}")
    k = int(k)
    if k < 1:
        raise RetrievalError(f"k must be >= 1, got {k}")
    if k > n:
        raise RetrievalError(f"k={k} > memory size {n}")
    return k


def check_int_param(name: str, value: Any, low: int = 1, high: int | None = None,
                    high_name: str = "") -> int:
    """A search parameter that is an int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise RetrievalError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise RetrievalError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise RetrievalError(f"{name}={value} > {high_name}={high}")
    return int(value)


def check_float_param(name: str, value: Any, low: float, high: float,
                      low_open: bool = False) -> float:
    """A search parameter that is a real number in [low, high] (or (low, high])."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RetrievalError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (low < value if low_open else low <= value) or not value <= high:
        raise RetrievalError(f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value:g}")
    return value


def _dir_bytes(directory: str) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


# --------------------------------------------------------------------------------- base class


class Index:
    """Maximum-inner-product index over [n, d] float32 embeddings with int64 ids."""

    name: str = "index"

    def __init__(self) -> None:
        self._d: int | None = None
        self._ids: np.ndarray | None = None  # row -> id

    # -- public API ---------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return 0 if self._ids is None else int(self._ids.shape[0])

    @property
    def dim(self) -> int | None:
        return self._d

    def __len__(self) -> int:
        return self.ntotal

    def build(self, embeddings: Any, ids: Any = None) -> "Index":
        """Indexes ``embeddings`` [n, d] under ``ids`` [n] (default ``arange(n)``)."""
        emb = check_embeddings(embeddings, "embeddings")
        ids_arr = check_ids(ids, emb.shape[0])
        self._d = emb.shape[1]
        self._ids = ids_arr
        self._build(emb, ids_arr)
        return self

    def add(self, embeddings: Any, ids: Any = None) -> "Index":
        """Adds ``embeddings`` [m, d] under new ``ids`` [m] (default: after the largest id)."""
        self._require_built()
        emb = check_embeddings(embeddings, "embeddings", self._d)
        ids_arr = check_ids(ids, emb.shape[0], existing=self._ids)
        self._add(emb, ids_arr)
        self._ids = np.concatenate([self._ids, ids_arr])
        return self

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``queries`` [q, d] -> (scores [q, k] float32 descending, ids [q, k] int64)."""
        self._require_built()
        q = check_embeddings(queries, "queries", self._d)
        k = check_k(k, self.ntotal)
        scores, ids = self._search(q, k)
        return np.asarray(scores, dtype=np.float32), np.asarray(ids, dtype=np.int64)

    def search_params(self) -> dict[str, Any]:
        """The search-time parameters in effect, by name: what ``set_search_params`` accepts.

        Unresolved defaults (e.g. FAISS nprobe before ``build``) are None."""
        return {name: getattr(self, name) for name in self._search_param_names()}

    def set_search_params(self, **params: Any) -> "Index":
        """Changes search-time parameters without rebuilding; ``config()`` and ``save`` keep them.

        Names this backend does not accept, and out-of-range values, raise RetrievalError;
        nothing is changed then."""
        accepted = self._search_param_names()
        for name in params:
            if name not in accepted:
                raise RetrievalError(f"{self.name} has no search parameter {name!r}; accepted: "
                                     f"{', '.join(accepted) or 'none'}")
        checked = {name: self._check_search_param(name, v) for name, v in params.items()}
        for name, value in checked.items():
            setattr(self, name, value)
        if self._ids is not None:
            self._apply_search_params()
        return self

    def save(self, directory: str, memory_fingerprint: str) -> None:
        """Writes the index to `directory` (local, gs://, ram://); `META`, written last, marks it whole.

        Backends write local files only (FAISS and ScaNN cannot write elsewhere): for a non-local
        `directory` they write to a local temporary directory, which is then copied."""
        self._require_built()
        if not isinstance(memory_fingerprint, str) or not memory_fingerprint:
            raise RetrievalError("memory_fingerprint must be a non-empty string")
        directory = fs.fspath(directory)
        fs.makedirs(directory)
        meta_path = fs.join(directory, META)
        if fs.exists(meta_path):  # until the new META is written, no reader trusts the files
            fs.remove(meta_path)
        if fs.is_local(directory):
            self._save(directory)
        else:
            with tempfile.TemporaryDirectory() as staging:
                self._save(staging)
                fs.copy_tree(staging, directory)
        meta = {
            "kind": self.name,
            "memory_fingerprint": memory_fingerprint,
            "n": self.ntotal,
            "d": self._d,
            "config": self.config(),
        }
        fs.write_text(meta_path, json.dumps(meta))

    @classmethod
    def load(cls, directory: str, memory_fingerprint: str) -> "Index":
        """The index saved in ``directory`` (any kind); RetrievalError if built for another memory."""
        # the registry imports every backend, which all import this module
        from retrieval.backends import KIND_CLASS, KINDS, make_index

        directory = fs.fspath(directory)
        path = fs.join(directory, META)
        if not fs.isfile(path):
            raise RetrievalError(f"no saved index in {directory} (missing {META})")
        meta = json.loads(fs.read_text(path))
        if meta["memory_fingerprint"] != memory_fingerprint:
            raise RetrievalError(
                f"index was built for another memory (stored fingerprint "
                f"{meta['memory_fingerprint']!r} != {memory_fingerprint!r})")
        kind = meta["kind"]
        if kind not in KINDS:
            raise RetrievalError(f"saved index has unknown kind {kind!r}")
        target = KIND_CLASS[kind]
        if cls is not Index and not issubclass(target, cls):
            raise RetrievalError(f"saved index is of kind {kind!r}, not a {cls.__name__}")
        obj = make_index(kind, **_ctor_params(meta["config"]))
        obj._d = int(meta["d"])
        if fs.is_local(directory):
            obj._load_local(directory, meta)
        else:  # backends read local files only: copy to a temporary directory (loads hold no files open)
            with tempfile.TemporaryDirectory() as staging:
                fs.copy_tree(directory, staging)
                obj._load_local(staging, meta)
        return obj

    def _load_local(self, directory: str, meta: dict) -> None:
        self._ids = np.load(os.path.join(directory, "ids.npy"))
        self._load(directory, meta)

    def size_bytes(self) -> int:
        self._require_built()
        with tempfile.TemporaryDirectory() as tmp:
            self._save(tmp)
            return _dir_bytes(tmp)

    def config(self) -> dict:
        return {"kind": self.name, **self._config()}

    # -- backend hooks ------------------------------------------------------------------------
    def _require_built(self) -> None:
        if self._ids is None:
            raise RetrievalError(f"search before build: {self.name} index has not been built")

    def _build(self, emb: np.ndarray, ids: np.ndarray) -> None:
        raise NotImplementedError

    def _add(self, emb: np.ndarray, ids: np.ndarray) -> None:
        raise RetrievalError(f"{self.name} does not support add")

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _save(self, directory: str) -> None:
        """Writes the backend's files into the local `directory` (`save` copies them elsewhere)."""
        raise NotImplementedError

    def _load(self, directory: str, meta: dict) -> None:
        """Reads the backend's files from the local `directory` fully into memory."""
        raise NotImplementedError

    def _config(self) -> dict:
        return {}

    def _search_param_names(self) -> tuple[str, ...]:
        """Attributes ``set_search_params`` may change (also constructor arguments, so that
        ``load`` restores them from the saved config)."""
        return ()

    def _check_search_param(self, name: str, value: Any) -> Any:
        return value

    def _apply_search_params(self) -> None:
        """Pushes the search attributes into the built backend (called after build/load too)."""


def _ctor_params(config: dict) -> dict:
    params = dict(config.get("params", {}))
    params.pop("kind", None)  # the registry kind fixes the FAISS kind
    return params


# -------------------------------------------------------------------------------- helpers


def recall_at_k(approx_ids: Any, exact_ids: Any, k: int) -> float:
    """Mean over queries of |approx[:, :k] ∩ exact[:, :k]| / k; both [q, >=k]."""
    a = np.asarray(approx_ids)
    e = np.asarray(exact_ids)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
        raise RetrievalError(f"recall_at_k needs two [q, >=k] id arrays, got {a.shape} and {e.shape}")
    if k < 1 or a.shape[1] < k or e.shape[1] < k:
        raise RetrievalError(f"recall_at_k: k={k} exceeds the number of ids per query")
    hits = [len(np.intersect1d(a[i, :k], e[i, :k])) for i in range(a.shape[0])]
    return float(np.mean(hits) / k)


def search_excluding(index: Index, queries: Any, k: int, exclude_ids: Any = None,
                     duplicate_threshold: float | None = None,
                     max_extra: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Top-k per query [q, k] without its own id (``exclude_ids[i]``) or near-duplicates.

    Results with score > ``duplicate_threshold`` are dropped. Asks the index for k + extra
    results, doubling extra (8, 16, ..., up to ``max_extra``) until every query keeps k;
    raises ``RetrievalError`` if that is still not enough.
    """
    q = np.asarray(queries)
    nq = q.shape[0] if q.ndim == 2 else -1
    if exclude_ids is not None:
        exclude_ids = np.asarray(exclude_ids)
        if exclude_ids.ndim != 1 or exclude_ids.shape[0] != nq:
            raise RetrievalError(
                f"exclude_ids have wrong length/shape {exclude_ids.shape}, expected ({nq},)")
        exclude_ids = exclude_ids.astype(np.int64)
    if duplicate_threshold is not None and not np.isfinite(duplicate_threshold):
        raise RetrievalError("duplicate_threshold must be finite")
    n = index.ntotal
    check_k(k, n) if index.ntotal else index._require_built()
    extra = 8
    while True:
        kk = min(k + extra, n)
        scores, ids = index.search(q, kk)
        keep = ids >= 0
        if exclude_ids is not None:
            keep &= ids != exclude_ids[:, None]
        if duplicate_threshold is not None:
            keep &= scores <= duplicate_threshold
        if (keep.sum(axis=1) >= k).all():
            order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept first, order preserved
            return (np.take_along_axis(scores, order, axis=1),
                    np.take_along_axis(ids, order, axis=1))
        if extra >= max_extra or kk >= n:
            short = int((keep.sum(axis=1) < k).sum())
            raise RetrievalError(
                f"not enough results after exclusion: {short} queries have < {k} of {kk} left")
        extra = min(extra * 2, max_extra)
