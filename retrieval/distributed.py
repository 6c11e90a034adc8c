"""A memory split into pieces (shards of one host, or processes of a job): per-piece top-k, merged.

At scale the memory does not fit one index: each piece gets its own index over its rows and
the k best of every piece are merged into the global top-k. Exact search per piece gives
exactly the one-piece result (ties broken by lower id everywhere, as `ExactIndex`); an
approximate backend per piece gives at least the recall it has on each piece.

  * `merge_topk(scores_list, ids_list, k)`: merges per-piece results [q, k_i] (from
    `retrieval.topk`, the one top-k of the layer).
  * `ShardedIndex`: one index per memory-store shard (or any row ranges), searched and merged.
  * `search_across_processes(local_index, queries, k)`: every process holds one piece and the
    same queries; the candidates are all-gathered (`multihost_utils.process_allgather`) and
    merged, so every process returns the global top-k.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from retrieval.backends import Index, RetrievalError, make_index
from retrieval.memory_store import MemoryStore
from retrieval.topk import merge_topk  # re-exported: importers take it from here too

__all__ = ["merge_topk", "ShardedIndex", "search_across_processes"]


class ShardedIndex:
    """One index per piece of a memory; `search` returns the merged global top-k."""

    def __init__(self, pieces: Sequence[Index]):
        if not pieces:
            raise RetrievalError("ShardedIndex: no pieces")
        self.pieces = list(pieces)

    @classmethod
    def from_store(cls, store: MemoryStore, modality: str, kind: str = "exact", **params) -> "ShardedIndex":
        """One `kind` index per shard of `store` over its `modality` embeddings (memory-mapped)."""
        return cls([make_index(kind, **params).build(np.asarray(emb, np.float32), np.asarray(ids))
                    for ids, emb in store.iter_shards(modality)])

    @property
    def ntotal(self) -> int:
        return sum(p.ntotal for p in self.pieces)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k > self.ntotal:
            raise RetrievalError(f"k={k} exceeds the memory size {self.ntotal}")
        results = [p.search(queries, min(k, p.ntotal)) for p in self.pieces]
        return merge_topk([s for s, _ in results], [i for _, i in results], k)


def search_across_processes(local_index: Index, queries: np.ndarray, k: int,
                            allgather: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k when every process holds one piece of the memory and the same queries.

    Each process returns k candidates (a piece smaller than k pads with -inf scores and id -1,
    which never win while the whole memory has >= k rows).
    """
    if allgather is None:
        from jax.experimental import multihost_utils

        def allgather(x):
            return np.asarray(multihost_utils.process_allgather(x))  # [processes, ...]
    q = np.asarray(queries, np.float32)
    local_k = min(k, local_index.ntotal)
    scores = np.full((q.shape[0], k), -np.inf, np.float32)
    ids = np.full((q.shape[0], k), -1, np.int64)
    if local_k:
        scores[:, :local_k], ids[:, :local_k] = local_index.search(q, local_k)
    all_scores, all_ids = allgather(scores), allgather(ids)
    total = int(np.sum(allgather(np.asarray(local_index.ntotal, np.int64))))
    if k > total:
        raise RetrievalError(f"k={k} exceeds the memory size {total} (over {len(all_scores)} processes)")
    return merge_topk(list(all_scores), list(all_ids), k)
