"""kNN backends of the retrieval layer: maximum-inner-product search behind one interface.

Every backend searches L2-normalised float32 embeddings by inner product (== cosine). The
embeddings are *not* normalised here; callers pass normalised vectors.

  base.py         RetrievalError, input checks, the `Index` interface, recall_at_k, search_excluding
  exact.py        ExactIndex: numpy brute force in blocks (the oracle)
  faiss_index.py  FaissIndex: Flat, IVF-Flat, IVF-PQ + exact refine, HNSW
  scann_index.py  ScannIndex: brute force, asymmetric hashing, tree + AH, with exact reorder
  jax_index.py    JaxIndex: on-device lax.top_k / lax.approx_max_k over a sharded memory
  __init__.py     the registry: KINDS, make_index, load_index

Interface (``Index``):
  * ``build(embeddings [n, d] float32, ids [n] int64 | None)``; ids default to ``arange(n)``.
  * ``add(embeddings, ids)``: incremental for ``exact`` and every FAISS kind (IVF/PQ after the
    training done by ``build``). ``scann`` and ``jax_*`` support ``add`` by *rebuilding* from the
    concatenated embeddings they keep on the host (ScaNN retrains its quantisers on the union).
  * ``search(queries [q, d], k) -> (scores [q, k] float32 descending, ids [q, k] int64)``.
  * ``set_search_params(**params)`` / ``search_params() -> dict``: search-time settings changed
    without rebuilding (FAISS nprobe, k_factor, ef_search; ScaNN num_leaves_to_search, reorder;
    jax_approx recall_target); reported by ``config()`` and kept by ``save``.
  * ``save(directory, memory_fingerprint)`` / classmethod ``load(directory, memory_fingerprint)``;
    ``Index.load`` dispatches on the stored kind; a different fingerprint raises
    ``RetrievalError`` ("index was built for another memory"). ``directory`` may be any
    ``vlcore.fs`` path (gs://): backends write local files, staged through a temporary directory.
  * ``size_bytes()`` (bytes of the serialised index) and ``config()`` (settings used, including
    the defaults resolved from n and d at build time).

``make_index(kind, **params)`` builds an unbuilt index of one of ``KINDS``. ``recall_at_k`` and
``search_excluding`` are backend-agnostic helpers. The exact top-k and its merge (descending
score, ties by lower id) live in ``retrieval.topk``.
"""

from __future__ import annotations

from typing import Any, Callable

from retrieval.backends.base import Index, RetrievalError, recall_at_k, search_excluding
from retrieval.backends.exact import ExactIndex
from retrieval.backends.faiss_index import FaissIndex
from retrieval.backends.jax_index import JaxIndex
from retrieval.backends.scann_index import ScannIndex

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
KIND_CLASS: dict[str, type] = {
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
