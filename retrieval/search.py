"""Search modes: which modality a query searches and which modality's embeddings come back.

RECO's uni-modal search with cross-modal payload: an image query searches the memory's images
and returns the matched pairs' *text* embeddings; a text query searches texts and returns their
*images*. The payload is read from the memory store's shards (memory-mapped), so a memory larger
than RAM works; the index only has to know the searched modality.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from retrieval.backends import Index, RetrievalError, search_excluding
from retrieval.memory_store import MemoryStore, MemoryStoreError


@dataclasses.dataclass(frozen=True)
class SearchMode:
    """query modality -> searched modality of the memory -> returned payload modality."""

    query: str
    searched: str
    payload: str


# RECO's variants (paper, Table 5): the default, and the two ablations of search and fusion.
RECO_MODES = {
    "uni_modal_search": {"image": SearchMode("image", "image", "text"), "text": SearchMode("text", "text", "image")},
    "cross_modal_search": {"image": SearchMode("image", "text", "text"), "text": SearchMode("text", "image", "image")},
    "uni_modal_fusion": {"image": SearchMode("image", "image", "image"), "text": SearchMode("text", "text", "text")},
}


@dataclasses.dataclass(frozen=True)
class Neighbours:
    ids: np.ndarray  # [queries, k] int64, memory ids
    scores: np.ndarray  # [queries, k] float32, similarity in the searched modality
    embeddings: np.ndarray  # [queries, k, dim] float32, the payload modality's embeddings


def gather_rows(store: MemoryStore, modality: str, ids: np.ndarray) -> np.ndarray:
    """Embeddings [*ids.shape, dim] (float32) of memory ids, read shard by shard from the memmaps."""
    try:
        rows = store.rows_of(ids).reshape(-1)
    except MemoryStoreError as e:
        raise RetrievalError(str(e)) from None
    out = np.empty((rows.size, store.dim), np.float32)
    start = 0
    for shard in store.shard_arrays(modality):
        stop = start + len(shard)
        inside = (rows >= start) & (rows < stop)
        if inside.any():
            out[inside] = shard[rows[inside] - start]
        start = stop
    return out.reshape(*np.shape(ids), store.dim)


def neighbours(index: Index, store: MemoryStore, queries: np.ndarray, k: int, mode: SearchMode, *,
               exclude_ids: np.ndarray | None = None, duplicate_threshold: float | None = None) -> Neighbours:
    """The k nearest memory entries of each query in `mode.searched`, with `mode.payload` embeddings.

    `index` must have been built over the store's `mode.searched` embeddings with the store's ids.
    exclude_ids [queries]: each query's own memory id (training-time retrieval); results scoring
    above duplicate_threshold (near-duplicates of the query) are dropped too.
    """
    for modality in (mode.searched, mode.payload):
        if modality not in store.modalities:
            raise RetrievalError(f"mode {mode}: the memory has no {modality!r} embeddings ({store.modalities})")
    if index.ntotal != store.count:
        raise RetrievalError(f"the index holds {index.ntotal} entries but the memory {store.count}")
    scores, ids = search_excluding(index, queries, k, exclude_ids, duplicate_threshold)
    return Neighbours(ids, scores.astype(np.float32), gather_rows(store, mode.payload, ids))
