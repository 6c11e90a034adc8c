"""`ScannIndex`: a ScaNN dot-product searcher (brute force, asymmetric hashing, or tree + AH)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from retrieval.backends.base import Index, RetrievalError, check_int_param


class ScannIndex(Index):
    """ScaNN dot-product searcher with the configuration the ScaNN docs recommend.

    ``mode="auto"``: n < 20k -> brute force; n < 100k -> asymmetric hashing (dims_per_block=2,
    anisotropic_quantization_threshold=0.2) + exact reorder; otherwise tree (num_leaves ~ sqrt(n),
    num_leaves_to_search ~ num_leaves/10) + AH + reorder. ``reorder`` is raised to >= 4k at search.
    ``add`` rebuilds the searcher from all embeddings (kept on the host).

    Search-time parameters (``set_search_params``), passed to ScaNN on every search:
    num_leaves_to_search (tree mode) and reorder (the candidates rescored exactly; AH and tree).
    """

    name = "scann"
    MODES = ("auto", "brute_force", "ah", "tree")
    _SEARCH_PARAMS = {"auto": ("num_leaves_to_search", "reorder"), "brute_force": (),
                      "ah": ("reorder",), "tree": ("num_leaves_to_search", "reorder")}

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

    # -- search-time parameters ---------------------------------------------------------------
    def _search_param_names(self) -> tuple[str, ...]:
        return self._SEARCH_PARAMS[self._resolved_mode or self.mode]

    def _check_search_param(self, name: str, value: Any) -> Any:
        if name == "num_leaves_to_search":
            return check_int_param(name, value, 1, self.num_leaves, "num_leaves")
        return check_int_param(name, value, 1)

    # -- backend hooks ------------------------------------------------------------------------
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
        if self._resolved_mode == "tree":  # per call: the serialised searcher keeps its build value
            kwargs["leaves_to_search"] = int(self.num_leaves_to_search)
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
