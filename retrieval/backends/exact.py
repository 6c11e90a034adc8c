"""`ExactIndex`: numpy brute force in query x memory blocks, the oracle of every other backend."""

from __future__ import annotations

import os

import numpy as np

from retrieval.backends.base import Index
from retrieval.topk import merge_topk, top_k_rows


class ExactIndex(Index):
    """Numpy brute force in query x memory blocks; the oracle (float64 scores, ties broken by lower id).

    Each [block_queries, block_rows] score block is reduced to its top-k and merged into the
    running top-k, so memory stays bounded by the block size, whatever n."""

    name = "exact"

    def __init__(self, block_rows: int = 16384, block_queries: int = 256) -> None:
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
        # Scores are float64 products rounded to float32: equal memory vectors then score exactly
        # equal, so the tie rule (lower id) decides their order. A float32 BLAS product is not
        # position-independent (OpenBLAS's kernels round identical columns differently in ~6% of
        # such ties on an AMD EPYC), which made the oracle's order of duplicate captions depend on
        # where they sit in the memory and on the machine.
        n = self._emb.shape[0]
        best: list = [None] * -(-q.shape[0] // self.block_queries)
        q64 = q.astype(np.float64)
        for rs in range(0, n, self.block_rows):
            block = self._emb[rs:rs + self.block_rows].astype(np.float64)
            block_ids = self._ids[rs:rs + self.block_rows]
            for b, qs in enumerate(range(0, q.shape[0], self.block_queries)):
                sc = (q64[qs:qs + self.block_queries] @ block.T).astype(np.float32)
                s, i = top_k_rows(sc, block_ids, min(k, sc.shape[1]))
                if best[b] is not None:
                    s, i = merge_topk([best[b][0], s], [best[b][1], i], min(k, best[b][0].shape[1] + s.shape[1]))
                best[b] = (s, i)
        if not best:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        return np.concatenate([s for s, _ in best]), np.concatenate([i for _, i in best])

    def _save(self, directory):
        np.save(os.path.join(directory, "embeddings.npy"), self._emb)
        np.save(os.path.join(directory, "ids.npy"), self._ids)

    def _load(self, directory, meta):
        self._emb = np.load(os.path.join(directory, "embeddings.npy"))
