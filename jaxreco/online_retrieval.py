"""On-device retrieval inside the train step: RECO's training neighbours searched online.

The precomputed path (`jaxreco.data.Artefacts.precompute`) searches every training pair once and
streams the neighbours from disk. Here the memory stays on the mesh instead, its rows sharded over
every device, and each step searches its own batch: no precompute, and a memory that changes (or
is too big to precompute the neighbours of every pair against) costs one search per step.

    memory store --DeviceMemory--> {modality: [rows, d]} sorted by id, padded, sharded by rows
    batch queries [b, d] --search_memory--> local top-k per device -> merged top-k [b, k]
                                            -> payload rows [b, k, d] (psum of each owner's rows)

The search is the exact index's (`retrieval.backends`): the own entry of each pair excluded when
the training split is the memory, results above the duplicate threshold dropped (as
`retrieval.backends.search_excluding`), ties broken by lower memory id, so the neighbours equal
the precomputed ones. `jax_approx` takes each device's top-k with `lax.approx_max_k`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxreco.data import Artefacts, SplitSpec
from jaxreco.model import Reco, reco_batch_loss
from retrieval.memory_store import MemoryStore
from retrieval.search import RECO_MODES, gather_rows

MEMORY_PREFIX = "memory/"  # batch keys of the device-resident memory (vlcore.training.loop merges them in)
OWN_ROW = "own_memory_row"  # batch key: the row of each pair's own memory entry, -1 = none to exclude
INDEX_KINDS = ("jax_exact", "jax_approx")  # retrieval.backends kinds whose search also runs in the step


class DeviceMemory:
    """A memory store's embeddings on a mesh: {modality: [rows, d] float32}, rows sorted by memory id
    (so lower row = lower id: `lax.top_k`'s tie rule is the exact index's), padded to a multiple of
    the device count and sharded over every mesh axis. Each process reads only its own rows."""

    def __init__(self, store: MemoryStore, mesh: Mesh, modalities: tuple[str, ...] = ("image", "text")):
        ids = store.ids()
        self.ids = np.sort(ids)  # row -> memory id
        self.count = len(ids)
        self.mesh = mesh
        self.rows = -(-self.count // mesh.size) * mesh.size
        sharding = NamedSharding(mesh, P(mesh.axis_names, None))
        self.arrays = {m: jax.make_array_from_callback((self.rows, store.dim), sharding,
                                                       lambda index, m=m: self._read(store, m, index[0]))
                       for m in modalities}

    def _read(self, store: MemoryStore, modality: str, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.rows)
        out = np.zeros((stop - start, store.dim), np.float32)  # padded rows: never returned (score -inf)
        real = min(stop, self.count)
        if real > start:
            out[:real - start] = gather_rows(store, modality, self.ids[start:real])
        return out


def search_memory(queries: jax.Array, searched: jax.Array, payload: jax.Array, own_rows: jax.Array, *,
                  mesh: Mesh, k: int, count: int, approximate: bool = False, recall_target: float = 0.95,
                  duplicate_threshold: float | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The k best memory rows of each query, with their payload embeddings; jittable.

    queries [b, d]; searched, payload [rows, d] sharded by rows over `mesh` (rows >= `count` are
    padding); own_rows [b] int32, the row excluded from each query's results (-1 = none). Results
    scoring above `duplicate_threshold` are dropped. Returns (scores [b, k] descending, rows [b, k]
    int32, payload neighbours [b, k, d]), replicated; ties by lower row. A query left with fewer than
    k admissible rows gets excluded ones at score -inf.
    """
    axes = mesh.axis_names
    shard_rows = searched.shape[0] // mesh.size
    k_local = min(k, shard_rows)

    def local(q, searched_shard, payload_shard, own):
        offset = jax.lax.axis_index(axes) * shard_rows
        row = offset + jnp.arange(shard_rows)
        scores = jnp.dot(q, searched_shard.T, precision=jax.lax.Precision.HIGHEST)
        keep = (row < count)[None, :] & (row[None, :] != own[:, None])
        if duplicate_threshold is not None:
            keep &= scores <= duplicate_threshold
        scores = jnp.where(keep, scores, -jnp.inf)
        if approximate:
            s, i = jax.lax.approx_max_k(scores, k_local, recall_target=recall_target)
        else:
            s, i = jax.lax.top_k(scores, k_local)
        # Every device's candidates, in device (= row) order: the merge's ties go to the lower row.
        s = jax.lax.all_gather(s, axes, axis=1, tiled=True, to="invarying")
        r = jax.lax.all_gather((i + offset).astype(jnp.int32), axes, axis=1, tiled=True, to="invarying")
        top, position = jax.lax.top_k(s, k)
        best = jnp.take_along_axis(r, position, axis=1)
        # Each device contributes the payload of the winners it holds; the others add zeros (exact).
        mine = (best >= offset) & (best < offset + shard_rows)
        rows = payload_shard[jnp.clip(best - offset, 0, shard_rows - 1)]
        return top, best, jax.lax.psum(jnp.where(mine[..., None], rows, 0.0), axes)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes, None), P(axes, None), P()),
                         out_specs=(P(), P(), P()))(queries, searched, payload, own_rows)


@dataclasses.dataclass(frozen=True)
class OnlineNeighbours:
    """RECO's two sides searched in a `DeviceMemory` (mode, k and thresholds as the precompute's)."""

    memory: DeviceMemory
    mode_name: str
    k: int
    approximate: bool = False
    recall_target: float = 0.95
    duplicate_threshold: Mapping[str, float | None] = dataclasses.field(default_factory=dict)

    def device_arrays(self) -> dict[str, jax.Array]:
        return {MEMORY_PREFIX + m: a for m, a in self.memory.arrays.items()}

    def side(self, side: str, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(scores [b, k], rows [b, k], payload neighbours [b, k, d]) of batch[side] [b, d]."""
        mode = RECO_MODES[self.mode_name][side]
        return search_memory(batch[side], batch[MEMORY_PREFIX + mode.searched], batch[MEMORY_PREFIX + mode.payload],
                             batch[OWN_ROW], mesh=self.memory.mesh, k=self.k, count=self.memory.count,
                             approximate=self.approximate, recall_target=self.recall_target,
                             duplicate_threshold=self.duplicate_threshold.get(side))

    def training_batch(self, batch: Mapping[str, jax.Array]) -> tuple[dict[str, jax.Array], jax.Array]:
        """({"image", "text" [b, d]; "image_neighbours", "text_neighbours" [b, k, d]}, the fraction of
        neighbour slots left without an admissible row: 0 unless the memory is nearly all excluded)."""
        out, short = {}, []
        for side in ("image", "text"):
            scores, _, neighbours = self.side(side, batch)
            out[side], out[f"{side}_neighbours"] = batch[side], jax.lax.stop_gradient(neighbours)
            short.append(jnp.mean(jnp.isneginf(scores)))
        return out, (short[0] + short[1]) / 2


def build(artefacts: Artefacts, memory: SplitSpec, mesh: Mesh, mode_name: str, k: int, index_kind: str,
          duplicate_threshold: Mapping[str, float]) -> OnlineNeighbours:
    """The memory split on `mesh`, searched like an index of `index_kind` (jax_exact | jax_approx, whose
    recall_target it takes); thresholds 0 = off, as the precompute's."""
    from retrieval.backends import make_index

    if index_kind not in INDEX_KINDS:
        raise ValueError(f"online retrieval searches like {INDEX_KINDS}, not {index_kind!r}")
    index = make_index(index_kind)
    store = artefacts.store(memory)  # collective: every process encodes its share
    return OnlineNeighbours(DeviceMemory(store, mesh), mode_name, k, index.approximate, index.recall_target,
                            {side: duplicate_threshold.get(side) or None for side in ("image", "text")})


def reco_online_loss(module: Reco, params: Any, online: OnlineNeighbours,
                     batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    """`reco_batch_loss` of a batch of queries whose neighbours are searched here."""
    batch, short = online.training_batch(batch)
    loss, metrics = reco_batch_loss(module, params, batch)
    return loss, {**metrics, "online_short_neighbours": short}


def train_arrays(artefacts: Artefacts, train: SplitSpec, memory: SplitSpec) -> dict[str, np.ndarray]:
    """{"image", "text" [n, d] float32; OWN_ROW [n] int32} of the training split: the queries, and the
    `DeviceMemory` row of each pair's own entry when the training split is the memory (else -1)."""
    train_store, memory_store = artefacts.store(train), artefacts.store(memory)  # collective
    ids = train_store.ids()
    rows = np.full(len(ids), -1, np.int32)
    if train == memory:  # as the precompute: each pair's own entry is excluded
        memory_ids = np.sort(memory_store.ids())  # DeviceMemory's row order
        rows = np.searchsorted(memory_ids, ids).astype(np.int32)
    return {"image": np.asarray(train_store.embeddings("image"), np.float32),
            "text": np.asarray(train_store.embeddings("text"), np.float32), OWN_ROW: rows}
