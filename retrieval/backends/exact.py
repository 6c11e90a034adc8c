"""`ExactIndex`: numpy brute force in query x memory blocks, the oracle of every other backend."""

from __future__ import annotations

import os

import numpy as np

from retrieval.backends.base import Index
from retrieval.topk import merge_topk, top_k_rows


class ExactIndex(Index):
    """Numpy brute force in query x memory blocks; the oracle (ties broken by lower id).

    Each [block_queries, block_rows] score block is reduced to its top-k and merged into the
    running top-k, so memory stays bounded by the block size, whatever n."""

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
                s, i = top_k_rows(sc, self._ids[rs:rs + self.block_rows], min(k, sc.shape[1]))
                if best_s is None:
                    best_s, best_i = s, i
                else:
                    best_s, best_i = merge_topk([best_s, s], [best_i, i],
                                                min(k, best_s.shape[1] + s.shape[1]))
            out_s[qs:qs + len(qb)] = best_s
            out_i[qs:qs + len(qb)] = best_i
        return out_s, out_i

    def _save(self, directory):
        np.save(os.path.join(directory, "embeddings.npy"), self._emb)
        np.save(os.path.join(directory, "ids.npy"), self._ids)

    def _load(self, directory, meta):
        self._emb = np.load(os.path.join(directory, "embeddings.npy"))
