"""A memory split into pieces (shards of one host, or processes of a job): per-piece top-k, merged.

At scale the memory does not fit one index: each piece gets its own index over its rows and
the k best of every piece are merged into the global top-k. Exact search per piece gives
exactly the one-piece result (ties broken by lower id everywhere, as `ExactIndex`); an
approximate backend per piece gives at least the recall it has on each piece.

  * `merge_topk(scores_list, ids_list, k)`: merges per-piece results [q, k_i] (from
    `retrieval.topk`, the one top-k of the layer).
  * `ShardedIndex`: one index per memory-store shard (or any row ranges), searched and merged.
  * `build_sharded_index(store, modality, directory, pieces=P, ...)`: the index of a memory in P
    pieces (contiguous runs of its shards), piece j built and saved by process j mod (process
    count), then every process loads them all: index building split across a job's hosts. The
    pieces depend on P only, not on the process count, so any number of processes gives the same
    neighbours; an interrupted build keeps its saved pieces.
  * `search_across_processes(local_index, queries, k)`: every process holds one piece and the
    same queries; the candidates are all-gathered (`multihost_utils.process_allgather`) and
    merged, so every process returns the global top-k.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from retrieval.backends import Index, RetrievalError, load_index, make_index
from retrieval.memory_store import MemoryStore
from retrieval.topk import merge_topk  # re-exported: importers take it from here too
from vlcore import fs

__all__ = ["merge_topk", "ShardedIndex", "build_sharded_index", "piece_shards", "search_across_processes"]


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

    @property
    def dim(self) -> int | None:
        return self.pieces[0].dim

    def config(self) -> dict:
        """What determines its results (precompute manifests record it): every piece's config and size."""
        return {"kind": "sharded", "pieces": [{**p.config(), "n": p.ntotal} for p in self.pieces]}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k > self.ntotal:
            raise RetrievalError(f"k={k} exceeds the memory size {self.ntotal}")
        results = [p.search(queries, min(k, p.ntotal)) for p in self.pieces]
        return merge_topk([s for s, _ in results], [i for _, i in results], k)

    def _require_built(self) -> None:  # what search_excluding asks of an empty index
        raise RetrievalError("search of an empty ShardedIndex")


def piece_shards(num_shards: int, pieces: int) -> list[range]:
    """The store shards of each of `pieces` pieces: contiguous runs, sizes differing by at most one
    (fewer pieces when the store has fewer shards)."""
    pieces = min(pieces, num_shards)
    return [range(j * num_shards // pieces, (j + 1) * num_shards // pieces) for j in range(pieces)]


def build_sharded_index(store: MemoryStore, modality: str, directory: str, *, kind: str,
                        params: dict | None = None, pieces: int, process_index: int = 0, process_count: int = 1,
                        barrier: Callable[[str], None] | None = None,
                        after_piece: Callable[[int], None] | None = None) -> ShardedIndex:
    """The `kind` index over `store`'s `modality` embeddings in `pieces` pieces, saved under
    `directory`/piece-JJJJJ (each tied to the store's fingerprint and its place) and loaded.

    Every process calls this with the same arguments: process p builds the pieces j with
    j % process_count == p that are not saved yet, all meet at `barrier`, then each loads every
    piece. Exact backends give exactly the one-piece neighbours (ties by lower id); an approximate
    one at least its recall on each piece. `after_piece(j)` runs after piece j is saved (tests)."""
    if isinstance(pieces, bool) or not isinstance(pieces, (int, np.integer)) or pieces < 1:
        raise RetrievalError(f"pieces={pieces!r}: expected an integer >= 1")
    if process_count > 1 and barrier is None:
        raise RetrievalError(f"build_sharded_index over {process_count} processes needs a barrier")
    if not 0 <= process_index < process_count:
        raise RetrievalError(f"process_index={process_index}: need 0 <= index < process_count={process_count}")
    shards = list(store.iter_shards(modality))
    groups = piece_shards(len(shards), int(pieces))

    def tag(j: int) -> tuple[str, str]:
        return (fs.join(directory, f"piece-{j:05d}"),
                f"{store.fingerprint()}/{modality}/piece {j} of {len(groups)} (shards {groups[j].start}-{groups[j].stop - 1})")

    def saved(j: int) -> Index | None:
        path, fingerprint = tag(j)
        try:
            return load_index(path, fingerprint)
        except (RetrievalError, OSError, ValueError):
            return None

    built: dict[int, Index] = {}
    for j in range(process_index, len(groups), process_count):
        index = saved(j)
        if index is None:
            ids = np.concatenate([np.asarray(shards[i][0]) for i in groups[j]])
            emb = np.concatenate([np.asarray(shards[i][1], np.float32) for i in groups[j]])
            index = make_index(kind, **(params or {})).build(emb, ids)
            index.save(*tag(j))
            if after_piece is not None:
                after_piece(j)
        built[j] = index
    if barrier is not None:
        barrier(f"sharded-index:{directory}")
    loaded = []
    for j in range(len(groups)):
        index = built.get(j) or saved(j)
        if index is None:
            raise RetrievalError(f"{tag(j)[0]}: piece {j} of the index is missing after every process built its share")
        loaded.append(index)
    return ShardedIndex(loaded)


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
