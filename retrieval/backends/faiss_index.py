"""`FaissIndex`: FAISS inner-product indexes (Flat, IVF-Flat, IVF-PQ + exact refine, HNSW)."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np

# faiss's loader logs at INFO which CPU build it picked (and the builds it could not load): noise
# on every command's terminal.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

from retrieval.backends.base import Index, RetrievalError, check_float_param, check_int_param


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

    Search-time parameters (``set_search_params``): nprobe (IVF kinds), k_factor (IVF-PQ: the
    refine step rescores k * k_factor candidates exactly), ef_search (HNSW).
    """

    FAISS_KINDS = ("flat", "ivf_flat", "ivf_pq", "hnsw")
    _SEARCH_PARAMS = {"flat": (), "ivf_flat": ("nprobe",), "ivf_pq": ("nprobe", "k_factor"),
                      "hnsw": ("ef_search",)}

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

    # -- search-time parameters ---------------------------------------------------------------
    def _search_param_names(self) -> tuple[str, ...]:
        return self._SEARCH_PARAMS[self.kind]

    def _check_search_param(self, name: str, value: Any) -> Any:
        if name == "nprobe":
            return check_int_param("nprobe", value, 1, self.nlist, "nlist")
        if name == "k_factor":
            return check_float_param("k_factor", value, 1.0, math.inf)
        return check_int_param(name, value, 1)

    def _apply_search_params(self) -> None:
        import faiss

        ps = faiss.ParameterSpace()  # reaches through IndexIDMap / IndexRefineFlat to the target
        if self.kind in ("ivf_flat", "ivf_pq"):
            ps.set_index_parameter(self._index, "nprobe", int(self.nprobe))
        if self.kind == "ivf_pq":
            # not ParameterSpace's "k_factor_rf": it truncates the factor to an int
            faiss.downcast_index(self._index.index).k_factor = float(self.k_factor)
        if self.kind == "hnsw":
            ps.set_index_parameter(self._index, "efSearch", int(self.ef_search))

    # -- backend hooks ------------------------------------------------------------------------
    def _factory_string(self) -> str:
        """The ``faiss.index_factory`` description of this kind ("np": no polysemous training,
        which the search never uses)."""
        inner = {"flat": "Flat", "ivf_flat": f"IVF{self.nlist},Flat",
                 "ivf_pq": f"IVF{self.nlist},PQ{self.pq_m}x{self.pq_nbits}np,RFlat",
                 "hnsw": f"HNSW{self.hnsw_m},Flat"}[self.kind]
        return f"IDMap,{inner}"

    def _build(self, emb, ids):
        import faiss

        n, d = emb.shape
        self._resolve_defaults(n, d)
        index = faiss.index_factory(d, self._factory_string(), faiss.METRIC_INNER_PRODUCT)
        if self.kind in ("ivf_flat", "ivf_pq"):  # seeded k-means: the same index on every run
            ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
            ivf.cp.seed = self.seed
            if self.kind == "ivf_pq":
                ivf.pq.cp.seed = self.seed
        if self.kind == "hnsw":
            faiss.downcast_index(index.index).hnsw.efConstruction = int(self.ef_construction)
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
