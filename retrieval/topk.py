"""The one top-k of the retrieval layer: descending score, ties broken by lower id.

  * `top_k_rows(scores [q, m], ids [m] | [q, m], k)`: the k best of each row of a score matrix.
  * `merge_topk(scores_list, ids_list, k)`: the global k best of per-piece results [q, k_i]
    (blocks of one exact search, shards of a memory, processes of a job).

Both return (scores [q, k] float32, ids [q, k] int64). The tie rule makes every split of a
memory (blocks, shards, processes) return exactly the one-piece result.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from retrieval.errors import RetrievalError

__all__ = ["top_k_rows", "merge_topk"]


def _check_k(k: Any, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise RetrievalError(f"{what}: k must be an int, got {type(k).__name__}")
    if k < 1:
        raise RetrievalError(f"{what}: k must be >= 1, got {k}")
    return int(k)


def _check_scores(scores: np.ndarray, what: str) -> None:
    if np.isnan(scores).any():  # NaN has no place in a descending order
        raise RetrievalError(f"{what}: scores contain NaN")


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of checked float32 scores [q, m] with int64 ids [q, m]; k <= m."""
    q, m = scores.shape
    if k < m:  # argpartition: O(m) per row instead of a full sort
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(m), (q, m))
    kth = np.take_along_axis(scores, part, axis=1).min(axis=1)
    # rows with more ties at the k-th score than places left: choose among all of them, by id
    crowded = np.flatnonzero((scores >= kth[:, None]).sum(axis=1) > k)
    cand_s = np.take_along_axis(scores, part, axis=1)
    cand_i = np.take_along_axis(ids, part, axis=1)
    order = np.lexsort((cand_i, -cand_s), axis=1)
    out_s = np.take_along_axis(cand_s, order, axis=1)
    out_i = np.take_along_axis(cand_i, order, axis=1)
    for r in crowded:
        cand = np.flatnonzero(scores[r] >= kth[r])
        best = cand[np.lexsort((ids[r, cand], -scores[r, cand]))[:k]]
        out_s[r], out_i[r] = scores[r, best], ids[r, best]
    return out_s, out_i


def top_k_rows(scores: Any, ids: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of every row of ``scores`` [q, m] whose columns have ``ids`` [m] (or [q, m]).

    Returns (scores [q, k] float32 descending, ids [q, k] int64); ties by lower id."""
    s = np.asarray(scores, np.float32)
    i = np.asarray(ids)
    if s.ndim != 2:
        raise RetrievalError(f"top_k_rows: scores must be a 2-D [q, m] array, got shape {s.shape}")
    if i.shape not in (s.shape[1:], s.shape):
        raise RetrievalError(f"top_k_rows: ids of shape {i.shape} do not match scores {s.shape}")
    if not np.issubdtype(i.dtype, np.integer):
        raise RetrievalError(f"top_k_rows: ids must be integers, got dtype {i.dtype}")
    k = _check_k(k, "top_k_rows")
    if k > s.shape[1]:
        raise RetrievalError(f"top_k_rows: k={k} but the rows have only {s.shape[1]} columns")
    _check_scores(s, "top_k_rows")
    return _top_k(s, np.broadcast_to(i.astype(np.int64), s.shape), k)


def merge_topk(scores_list: Sequence[Any], ids_list: Sequence[Any], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k of per-piece results ``scores_list[p]``, ``ids_list[p]`` [q, k_p].

    Returns (scores [q, k] float32 descending, ids [q, k] int64); ties by lower id. Pieces may
    carry padding (score -inf), which loses to every real candidate."""
    if not len(scores_list) or len(scores_list) != len(ids_list):
        raise RetrievalError("merge_topk: expected one (scores, ids) pair per piece")
    pieces_s = [np.asarray(s, np.float32) for s in scores_list]
    pieces_i = [np.asarray(i) for i in ids_list]
    for s, i in zip(pieces_s, pieces_i):
        if s.ndim != 2 or s.shape != i.shape:
            raise RetrievalError(f"merge_topk: scores {s.shape} and ids {i.shape} differ in shape "
                                 f"(each piece is [q, k_p])")
        if not np.issubdtype(i.dtype, np.integer):
            raise RetrievalError(f"merge_topk: ids must be integers, got dtype {i.dtype}")
    rows = {s.shape[0] for s in pieces_s}
    if len(rows) > 1:
        raise RetrievalError(f"merge_topk: pieces have different numbers of queries {sorted(rows)}")
    scores = np.concatenate(pieces_s, axis=1)
    ids = np.concatenate(pieces_i, axis=1).astype(np.int64)
    k = _check_k(k, "merge_topk")
    if k > scores.shape[1]:
        raise RetrievalError(f"merge_topk: k={k} but the pieces return only {scores.shape[1]} candidates")
    _check_scores(scores, "merge_topk")
    return _top_k(scores, ids, k)
