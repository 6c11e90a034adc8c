"""kNN backends of the retrieval layer: maximum-inner-product search behind one interface.

Every backend searches L2-normalised float32 embeddings by inner product (== cosine). The
embeddings are *not* normalised here; callers pass normalised vectors.

Interface (``Index``):
  * ``build(embeddings [n, d] float32, ids [n] int64 | None)``; ids default to ``arange(n)``.
  * ``add(embeddings, ids)``: incremental for ``exact`` and every FAISS kind (IVF/PQ after the
    training done by ``build``). ``scann`` and ``jax_*`` support ``add`` by *rebuilding* from the
    concatenated embeddings they keep on the host (ScaNN retrains its quantisers on the union).
  * ``search(queries [q, d], k) -> (scores [q, k] float32 descending, ids [q, k] int64)``.
  * ``save(directory, memory_fingerprint)`` / classmethod ``load(directory, memory_fingerprint)``;
    ``Index.load`` dispatches on the stored kind; a different fingerprint raises
    ``RetrievalError`` ("index was built for another memory").
  * ``size_bytes()`` (bytes of the serialised index) and ``config()`` (settings used, including
    the defaults resolved from n and d at build time).

``make_index(kind, **params)`` builds an unbuilt index of one of ``KINDS``. ``recall_at_k`` and
``search_excluding`` are backend-agnostic helpers.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Callable

import numpy as np

__all__ = [
    "RetrievalError",
    "Index",
    "ExactIndex",
    "FaissIndex",
    "ScannIndex",
    "JaxIndex",
    "KINDS",
    "make_index",
    "load_index",
    "recall_at_k",
    "search_excluding",
]

_META = "index_meta.json"


class RetrievalError(ValueError):
    """Any bad input to the retrieval backends (one-line message naming the problem)."""


# --------------------------------------------------------------------------- validation helpers


def _check_embeddings(x: Any, what: str, d: int | None = None) -> np.ndarray:
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


def _check_ids(ids: Any, n: int, existing: np.ndarray | None = None) -> np.ndarray:
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


def _check_k(k: Any, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise RetrievalError(f"k must be an int, got {type(k).__name__}")
    k = int(k)
    if k < 1:
        raise RetrievalError(f"k must be >= 1, got {k}")
    if k > n:
        raise RetrievalError(f"k={k} > memory size {n}")
    return k


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
        emb = _check_embeddings(embeddings, "embeddings")
        ids_arr = _check_ids(ids, emb.shape[0])
        self._d = emb.shape[1]
        self._ids = ids_arr
        self._build(emb, ids_arr)
        return self

    def add(self, embeddings: Any, ids: Any = None) -> "Index":
        self._require_built()
        emb = _check_embeddings(embeddings, "embeddings", self._d)
        ids_arr = _check_ids(ids, emb.shape[0], existing=self._ids)
        self._add(emb, ids_arr)
        self._ids = np.concatenate([self._ids, ids_arr])
        return self

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        self._require_built()
        q = _check_embeddings(queries, "queries", self._d)
        k = _check_k(k, self.ntotal)
        scores, ids = self._search(q, k)
        return np.asarray(scores, dtype=np.float32), np.asarray(ids, dtype=np.int64)

    def save(self, directory: str, memory_fingerprint: str) -> None:
        self._require_built()
        if not isinstance(memory_fingerprint, str) or not memory_fingerprint:
            raise RetrievalError("memory_fingerprint must be a non-empty string")
        os.makedirs(directory, exist_ok=True)
        self._save(directory)
        meta = {
            "kind": self.name,
            "memory_fingerprint": memory_fingerprint,
            "n": self.ntotal,
            "d": self._d,
            "config": self.config(),
        }
        with open(os.path.join(directory, _META), "w") as f:
            json.dump(meta, f)

    @classmethod
    def load(cls, directory: str, memory_fingerprint: str) -> "Index":
        path = os.path.join(directory, _META)
        if not os.path.isfile(path):
            raise RetrievalError(f"no saved index in {directory} (missing {_META})")
        with open(path) as f:
            meta = json.load(f)
        if meta["memory_fingerprint"] != memory_fingerprint:
            raise RetrievalError(
                f"index was built for another memory (stored fingerprint "
                f"{meta['memory_fingerprint']!r} != {memory_fingerprint!r})")
        kind = meta["kind"]
        if kind not in KINDS:
            raise RetrievalError(f"saved index has unknown kind {kind!r}")
        target = _KIND_CLASS[kind]
        if cls is not Index and not issubclass(target, cls):
            raise RetrievalError(f"saved index is of kind {kind!r}, not a {cls.__name__}")
        obj = make_index(kind, **_ctor_params(meta["config"]))
        obj._d = int(meta["d"])
        obj._ids = np.load(os.path.join(directory, "ids.npy"))
        obj._load(directory, meta)
        return obj

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
        raise NotImplementedError

    def _load(self, directory: str, meta: dict) -> None:
        raise NotImplementedError

    def _config(self) -> dict:
        return {}


def _ctor_params(config: dict) -> dict:
    params = dict(config.get("params", {}))
    params.pop("kind", None)  # the registry kind fixes the FAISS kind
    return params


# ---------------------------------------------------------------------------------- exact


def _topk_rows(scores: np.ndarray, row_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k per row of ``scores`` [q, m], descending, ties broken by lower id."""
    q, m = scores.shape
    if k < m:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(scores, part, axis=1).min(axis=1)
    else:
        kth = scores.min(axis=1)
    out_s = np.empty((q, k), np.float32)
    out_i = np.empty((q, k), np.int64)
    for r in range(q):
        cand = np.flatnonzero(scores[r] >= kth[r])  # includes every tie at the boundary
        order = np.lexsort((row_ids[cand], -scores[r, cand]))[:k]
        out_s[r] = scores[r, cand[order]]
        out_i[r] = row_ids[cand[order]]
    return out_s, out_i


class ExactIndex(Index):
    """Numpy brute force in query x memory blocks; the oracle (ties broken by lower id)."""

    name = "exact"

    def __init__(self, block_rows: int = 65536, block_queries: int = 256) -> None:
        super().__init__()
        self.block_rows = int(block_rows)
        self.block_queries = int(block_queries)
        self._emb: np.ndarray | None = None

    def _config(self) -> dict:
        return {"params": {"block_rows": self.block_rows, "block_queries": self.block_queries}}

    def _build(self, emb, ids):
        self._emb = emb.copy()

    def _add(self, emb, ids):
        self._emb = np.concatenate([self._emb, emb])

    def _search(self, q, k):
        n = self._emb.shape[0]
        out_s = np.empty((q.shape[0], k), np.float32)
        out_i = np.empty((q.shape[0], k), np.int64)
        for qs in range(0, q.shape[0], self.block_queries):
            qb = q[qs:qs + self.block_queries]
            best_s = best_i = None
            for rs in range(0, n, self.block_rows):
                sc = qb @ self._emb[rs:rs + self.block_rows].T
                rid = self._ids[rs:rs + self.block_rows]
                kk = min(k, sc.shape[1])
                s, i = _topk_rows(sc, rid, kk)
                if best_s is None:
                    best_s, best_i = s, i
                else:  # merge running top-k with this block's top-k
                    cs = np.concatenate([best_s, s], axis=1)
                    ci = np.concatenate([best_i, i], axis=1)
                    kk = min(k, cs.shape[1])
                    order = np.lexsort((ci, -cs), axis=1)[:, :kk]
                    best_s = np.take_along_axis(cs, order, axis=1)
                    best_i = np.take_along_axis(ci, order, axis=1)
            out_s[qs:qs + len(qb)] = best_s
            out_i[qs:qs + len(qb)] = best_i
        return out_s, out_i

    def _save(self, directory):
        np.save(os.path.join(directory, "embeddings.npy"), self._emb)
        np.save(os.path.join(directory, "ids.npy"), self._ids)

    def _load(self, directory, meta):
        self._emb = np.load(os.path.join(directory, "embeddings.npy"))


# ---------------------------------------------------------------------------------- faiss


def _pq_m(d: int) -> int:
    """Number of PQ sub-quantizers: d/4 if it divides d, else the largest divisor of d <= d/4."""
    target = max(1, d // 4)
    for m in range(target, 0, -1):
        if d % m == 0:
            return m
    return 1


class FaissIndex(Index):
    """FAISS inner-product index: kind in {"flat", "ivf_flat", "ivf_pq", "hnsw"}.

    Defaults resolved at build time from n and d: nlist = round(4 sqrt(n)) (clamped to n/39 so
    k-means has enough points), nprobe = max(1, nlist // 8); PQ m = d/4 sub-quantizers of 8 bits
    (fewer bits if n < 256) wrapped in ``IndexRefineFlat`` with k_factor 4; HNSW M = 32,
    efConstruction = 80, efSearch = 128. Ids are stored with ``IndexIDMap`` / ``add_with_ids``.
    """

    FAISS_KINDS = ("flat", "ivf_flat", "ivf_pq", "hnsw")

    def __init__(self, kind: str = "flat", nlist: int | None = None, nprobe: int | None = None,
                 pq_m: int | None = None, pq_nbits: int | None = None, k_factor: float = 4.0,
                 hnsw_m: int = 32, ef_construction: int = 80, ef_search: int = 128,
                 seed: int = 1234) -> None:
        super().__init__()
        if kind not in self.FAISS_KINDS:
            raise RetrievalError(f"unknown faiss kind {kind!r}; expected one of {self.FAISS_KINDS}")
        self.kind = kind
        self.name = f"faiss_{kind}"
        self.nlist, self.nprobe = nlist, nprobe
        self.pq_m, self.pq_nbits, self.k_factor = pq_m, pq_nbits, float(k_factor)
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        self.seed = seed
        self._index = None

    def _config(self) -> dict:
        p: dict[str, Any] = {"kind": self.kind, "seed": self.seed}
        if self.kind in ("ivf_flat", "ivf_pq"):
            p.update(nlist=self.nlist, nprobe=self.nprobe)
        if self.kind == "ivf_pq":
            p.update(pq_m=self.pq_m, pq_nbits=self.pq_nbits, k_factor=self.k_factor)
        if self.kind == "hnsw":
            p.update(hnsw_m=self.hnsw_m, ef_construction=self.ef_construction,
                     ef_search=self.ef_search)
        return {"metric": "inner_product", "params": p}

    def _resolve_defaults(self, n: int, d: int) -> None:
        if self.kind in ("ivf_flat", "ivf_pq"):
            if self.nlist is None:
                self.nlist = int(max(1, min(round(4 * math.sqrt(n)), n // 39 or 1)))
            if self.nlist > n:
                raise RetrievalError(f"nlist={self.nlist} > number of training points {n}")
            if self.nprobe is None:
                self.nprobe = max(1, self.nlist // 8)
            self.nprobe = int(min(self.nprobe, self.nlist))
        if self.kind == "ivf_pq":
            if self.pq_m is None:
                self.pq_m = _pq_m(d)
            if d % self.pq_m:
                raise RetrievalError(f"pq_m={self.pq_m} does not divide d={d}")
            if self.pq_nbits is None:
                self.pq_nbits = int(max(1, min(8, math.floor(math.log2(n)))))

    def _apply_search_params(self) -> None:
        import faiss

        if self.kind in ("ivf_flat", "ivf_pq"):
            faiss.extract_index_ivf(self._index).nprobe = int(self.nprobe)
        if self.kind == "ivf_pq":
            refine = faiss.downcast_index(self._index.index)
            refine.k_factor = float(self.k_factor)
        if self.kind == "hnsw":
            faiss.downcast_index(self._index.index).hnsw.efSearch = int(self.ef_search)

    def _build(self, emb, ids):
        import faiss

        n, d = emb.shape
        self._resolve_defaults(n, d)
        mip = faiss.METRIC_INNER_PRODUCT
        if self.kind == "flat":
            inner = faiss.IndexFlatIP(d)
        elif self.kind == "ivf_flat":
            inner = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, self.nlist, mip)
        elif self.kind == "ivf_pq":
            ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, self.nlist, self.pq_m,
                                   self.pq_nbits, mip)
            ivf.cp.seed = self.seed
            ivf.pq.cp.seed = self.seed
            inner = faiss.IndexRefineFlat(ivf)
        else:
            inner = faiss.IndexHNSWFlat(d, self.hnsw_m, mip)
            inner.hnsw.efConstruction = int(self.ef_construction)
        if self.kind == "ivf_flat":
            inner.cp.seed = self.seed
        index = faiss.IndexIDMap(inner)
        self._inner_keepalive = inner
        if not index.is_trained:
            index.train(emb)
        index.add_with_ids(emb, ids)
        self._index = index
        self._apply_search_params()

    def _add(self, emb, ids):
        self._index.add_with_ids(emb, ids)

    def _search(self, q, k):
        scores, ids = self._index.search(q, k)
        if (ids < 0).any():  # IVF with too few probed lists / HNSW dead ends: -1 placeholders
            scores = np.where(ids < 0, -np.inf, scores)
        return scores, ids

    def _save(self, directory):
        import faiss

        faiss.write_index(self._index, os.path.join(directory, "faiss.index"))
        np.save(os.path.join(directory, "ids.npy"), self._ids)

    def _load(self, directory, meta):
        import faiss

        self._index = faiss.read_index(os.path.join(directory, "faiss.index"))
        self._apply_search_params()

    def size_bytes(self) -> int:
        import faiss

        self._require_built()
        return int(faiss.serialize_index(self._index).nbytes)


# ---------------------------------------------------------------------------------- scann


class ScannIndex(Index):
    """ScaNN dot-product searcher with the configuration the ScaNN docs recommend.

    ``mode="auto"``: n < 20k -> brute force; n < 100k -> asymmetric hashing (dims_per_block=2,
    anisotropic_quantization_threshold=0.2) + exact reorder; otherwise tree (num_leaves ~ sqrt(n),
    num_leaves_to_search ~ num_leaves/10) + AH + reorder. ``reorder`` is raised to >= 4k at search.
    ``add`` rebuilds the searcher from all embeddings (kept on the host).
    """

    name = "scann"
    MODES = ("auto", "brute_force", "ah", "tree")

    def __init__(self, mode: str = "auto", num_leaves: int | None = None,
                 num_leaves_to_search: int | None = None, dims_per_block: int = 2,
                 aq_threshold: float = 0.2, reorder: int = 100, num_neighbors: int = 10,
                 training_sample_size: int = 100000) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise RetrievalError(f"unknown scann mode {mode!r}; expected one of {self.MODES}")
        self.mode = mode
        self.num_leaves, self.num_leaves_to_search = num_leaves, num_leaves_to_search
        self.dims_per_block, self.aq_threshold = int(dims_per_block), float(aq_threshold)
        self.reorder, self.num_neighbors = int(reorder), int(num_neighbors)
        self.training_sample_size = int(training_sample_size)
        self._resolved_mode: str | None = None
        self._searcher = None
        self._emb: np.ndarray | None = None

    def _config(self) -> dict:
        return {"resolved_mode": self._resolved_mode,
                "params": {"mode": self.mode, "num_leaves": self.num_leaves,
                           "num_leaves_to_search": self.num_leaves_to_search,
                           "dims_per_block": self.dims_per_block,
                           "aq_threshold": self.aq_threshold, "reorder": self.reorder,
                           "num_neighbors": self.num_neighbors,
                           "training_sample_size": self.training_sample_size}}

    def _build(self, emb, ids):
        import scann

        n = emb.shape[0]
        mode = self.mode
        if mode == "auto":
            mode = "brute_force" if n < 20_000 else ("ah" if n < 100_000 else "tree")
        self._resolved_mode = mode
        b = scann.scann_ops_pybind.builder(emb, min(self.num_neighbors, n), "dot_product")
        if mode == "tree":
            if self.num_leaves is None or self.mode == "auto":
                self.num_leaves = self.num_leaves or max(2, int(round(math.sqrt(n))))
            self.num_leaves = int(min(self.num_leaves, max(2, n // 50)))
            if self.num_leaves_to_search is None:
                self.num_leaves_to_search = max(1, self.num_leaves // 10)
            self.num_leaves_to_search = int(min(self.num_leaves_to_search, self.num_leaves))
            b = b.tree(num_leaves=self.num_leaves, num_leaves_to_search=self.num_leaves_to_search,
                       training_sample_size=min(n, self.training_sample_size))
        if mode == "brute_force":
            b = b.score_brute_force()
        else:
            b = b.score_ah(self.dims_per_block,
                           anisotropic_quantization_threshold=self.aq_threshold,
                           training_sample_size=min(n, self.training_sample_size))
            b = b.reorder(self.reorder)
        self._searcher = b.build()
        self._emb = emb.copy()

    def _add(self, emb, ids):
        all_emb = np.concatenate([self._emb, emb])
        self._build(all_emb, np.concatenate([self._ids, ids]))

    def _search(self, q, k):
        kwargs: dict[str, Any] = {"final_num_neighbors": k}
        if self._resolved_mode != "brute_force":
            kwargs["pre_reorder_num_neighbors"] = max(self.reorder, 4 * k)
        rows, dist = self._searcher.search_batched(q, **kwargs)
        rows = np.asarray(rows, dtype=np.int64)
        dist = np.asarray(dist, dtype=np.float32)
        if rows.shape[1] < k:  # fewer candidates than k (tiny leaves): pad, never silently wrong
            pad = k - rows.shape[1]
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
            dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids = np.where(rows >= 0, self._ids[np.clip(rows, 0, None)], -1)
        return dist, ids

    def _save(self, directory):
        sdir = os.path.join(directory, "scann")
        os.makedirs(sdir, exist_ok=True)
        self._searcher.serialize(sdir, relative_path=True)
        np.save(os.path.join(directory, "ids.npy"), self._ids)
        np.save(os.path.join(directory, "embeddings.npy"), self._emb)  # for add() rebuilds
        with open(os.path.join(directory, "scann_meta.json"), "w") as f:
            json.dump({"resolved_mode": self._resolved_mode}, f)

    def _load(self, directory, meta):
        import scann

        self._searcher = scann.scann_ops_pybind.load_searcher(os.path.join(directory, "scann"))
        self._emb = np.load(os.path.join(directory, "embeddings.npy"))
        with open(os.path.join(directory, "scann_meta.json")) as f:
            self._resolved_mode = json.load(f)["resolved_mode"]


# ------------------------------------------------------------------------------------ JAX


class JaxIndex(Index):
    """On-device search: memory rows sharded over a 1-D ``("memory",)`` mesh of all devices.

    Each device scores its shard and takes a local top-k (``lax.top_k`` when exact,
    ``lax.approx_max_k`` with ``recall_target`` when approximate); the q x (k * devices)
    candidates are gathered and reduced with ``lax.top_k`` again. Rows are padded to a multiple
    of the device count; padded rows score -inf and never win (k <= n). Queries go through the
    jitted search in fixed blocks of ``query_block`` rows, so only one shape compiles per k.
    ``add`` rebuilds the device array from the host copy.
    """

    def __init__(self, approximate: bool = False, recall_target: float = 0.95,
                 query_block: int = 256) -> None:
        super().__init__()
        self.approximate = bool(approximate)
        self.name = "jax_approx" if self.approximate else "jax_exact"
        self.recall_target = float(recall_target)
        self.query_block = int(query_block)
        self._emb: np.ndarray | None = None
        self._fns: dict[int, Callable] = {}

    def _config(self) -> dict:
        import jax

        return {"devices": jax.device_count(),
                "params": {"approximate": self.approximate, "recall_target": self.recall_target,
                           "query_block": self.query_block}}

    def _build(self, emb, ids):
        self._emb = emb.copy()
        self._place()

    def _place(self) -> None:
        import jax
        from jax.sharding import NamedSharding, PartitionSpec as P

        ndev = jax.device_count()
        n, d = self._emb.shape
        n_pad = -(-n // ndev) * ndev
        mem = np.zeros((n_pad, d), np.float32)
        mem[:n] = self._emb
        self._mesh = jax.make_mesh((ndev,), ("memory",),
                                   axis_types=(jax.sharding.AxisType.Explicit,))
        self._mem = jax.device_put(mem, NamedSharding(self._mesh, P("memory", None)))
        self._n_valid = n
        self._rows_per_shard = n_pad // ndev
        self._fns = {}

    def _search_fn(self, k: int) -> Callable:
        if k in self._fns:
            return self._fns[k]
        import jax
        import jax.numpy as jnp
        from jax.sharding import PartitionSpec as P

        rows = self._rows_per_shard
        n_valid = self._n_valid
        k_local = min(k, rows)
        approx, recall = self.approximate, self.recall_target

        def local(mem_shard, q):
            scores = jnp.dot(q, mem_shard.T, precision=jax.lax.Precision.HIGHEST)
            offset = jax.lax.axis_index("memory") * rows
            row = offset + jnp.arange(rows)
            scores = jnp.where((row < n_valid)[None, :], scores, -jnp.inf)
            if approx:
                s, i = jax.lax.approx_max_k(scores, k_local, recall_target=recall)
            else:
                s, i = jax.lax.top_k(scores, k_local)
            return s, (i + offset).astype(jnp.int32)

        replicated = jax.sharding.NamedSharding(self._mesh, P())
        sharded = jax.shard_map(local, mesh=self._mesh,
                                in_specs=(P("memory", None), P()),
                                out_specs=(P(None, "memory"), P(None, "memory")))

        @jax.jit
        def search(mem, q):
            s, i = sharded(mem, q)
            s = jax.sharding.reshard(s, replicated)  # gather the q x (k * devices) candidates
            i = jax.sharding.reshard(i, replicated)
            top_s, pos = jax.lax.top_k(s, k)
            return top_s, jnp.take_along_axis(i, pos, axis=1)

        self._fns[k] = search
        return search

    def _add(self, emb, ids):
        self._emb = np.concatenate([self._emb, emb])
        self._place()

    def _search(self, q, k):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec as P

        fn = self._search_fn(k)
        nq, d = q.shape
        bs = self.query_block
        out_s = np.empty((nq, k), np.float32)
        out_r = np.empty((nq, k), np.int64)
        rep = NamedSharding(self._mesh, P())
        for st in range(0, nq, bs):
            blk = q[st:st + bs]
            m = blk.shape[0]
            if m < bs:
                blk = np.concatenate([blk, np.zeros((bs - m, d), np.float32)])
            s, r = fn(self._mem, jax.device_put(blk, rep))
            out_s[st:st + m] = np.asarray(s)[:m]
            out_r[st:st + m] = np.asarray(r)[:m]
        return out_s, self._ids[out_r]

    def _save(self, directory):
        np.save(os.path.join(directory, "embeddings.npy"), self._emb)
        np.save(os.path.join(directory, "ids.npy"), self._ids)

    def _load(self, directory, meta):
        self._emb = np.load(os.path.join(directory, "embeddings.npy"))
        self._place()


# ------------------------------------------------------------------------------- registry

_FACTORIES: dict[str, Callable[..., Index]] = {
    "exact": lambda **p: ExactIndex(**p),
    "faiss_flat": lambda **p: FaissIndex(**{**p, "kind": "flat"}),
    "faiss_ivf_flat": lambda **p: FaissIndex(**{**p, "kind": "ivf_flat"}),
    "faiss_ivf_pq": lambda **p: FaissIndex(**{**p, "kind": "ivf_pq"}),
    "faiss_hnsw": lambda **p: FaissIndex(**{**p, "kind": "hnsw"}),
    "scann": lambda **p: ScannIndex(**p),
    "jax_exact": lambda **p: JaxIndex(**{**p, "approximate": False}),
    "jax_approx": lambda **p: JaxIndex(**{**p, "approximate": True}),
}
_KIND_CLASS: dict[str, type] = {
    "exact": ExactIndex, "faiss_flat": FaissIndex, "faiss_ivf_flat": FaissIndex,
    "faiss_ivf_pq": FaissIndex, "faiss_hnsw": FaissIndex, "scann": ScannIndex,
    "jax_exact": JaxIndex, "jax_approx": JaxIndex,
}
KINDS: tuple[str, ...] = tuple(_FACTORIES)


def make_index(kind: str, **params: Any) -> Index:
    """An unbuilt index of ``kind`` (one of ``KINDS``) with backend ``params``."""
    if kind not in _FACTORIES:
        raise RetrievalError(f"unknown index kind {kind!r}; known kinds: {', '.join(KINDS)}")
    try:
        return _FACTORIES[kind](**params)
    except TypeError as e:
        raise RetrievalError(f"bad parameters for index kind {kind!r}: {e}") from None


def load_index(directory: str, memory_fingerprint: str) -> Index:
    """Load any saved index (dispatching on its stored kind)."""
    return Index.load(directory, memory_fingerprint)


# -------------------------------------------------------------------------------- helpers


def recall_at_k(approx_ids: Any, exact_ids: Any, k: int) -> float:
    """Mean over queries of |approx[:, :k] ∩ exact[:, :k]| / k."""
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
    """Top-k per query without its own id (``exclude_ids[i]``) or near-duplicates.

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
    _check_k(k, n) if index.ntotal else index._require_built()
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
