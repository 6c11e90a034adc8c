"""Everything RECO computes once with its frozen encoder, cached on disk and resumable.

    root/<encoder fingerprint>/
        stores/<dataset>-<split>-v<version>/   memory stores (retrieval.memory_store) of every split
        index/<store>-<modality>-<kind>/       saved kNN indexes, tied to their store
        neighbours/<train store>--<memory store>--<mode>-<side>-k<K>/   precomputed TFRecord shards

Data flow: TFDS split -> `retrieval.encode_memory` (frozen embeddings of images and captions,
plus label payloads) -> kNN index over the memory -> neighbours of every training example
precomputed into TFRecords (`retrieval.precompute`, each JAX process writing its share) ->
streamed row by row in step order (`retrieval.neighbour_reader.NeighbourRows`) as the fusion's
training set. Evaluation queries (test
images, captions, class prompts) are searched directly with the same indexes.

Every step is keyed by what determines it (encoder weights, dataset, split, mode, k), so a
rerun reuses finished work and an interrupted one continues. `root` may be any `vlcore.fs` path
(a gs:// bucket); the TFDS data dir is TFDS's business (local or gs://).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from retrieval.backends import Index, RetrievalError, load_index, make_index
from retrieval.distributed import ShardedIndex, build_sharded_index
from retrieval.encode_memory import encode_memory
from retrieval.memory_store import MemoryStore
from retrieval.search import RECO_MODES, Neighbours, SearchMode, gather_rows
from retrieval.topk import merge_topk
from vlcore.atomic_files import atomic_write_json
from vlcore import fs
from vlcore.frozen_encoders import FrozenEncoder

log = logging.getLogger(__name__)

NEIGHBOUR_SOURCE_NAME = "source.json"  # beside a finished precompute: the stores and index it came from


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """One TFDS split of image-caption pairs (or labelled images, with caption_key "")."""

    dataset: str  # TFDS name[/config], e.g. "vl_world/quick", "coco_captions", "cars196"
    split: str
    image_key: str = "image"
    caption_key: str = "caption"  # "" = no captions (classification test sets)
    label_keys: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, c: Mapping[str, Any]) -> "SplitSpec":
        return cls(c["dataset"], c["split"], c.get("image_key", "image"), c.get("caption_key", "caption"),
                   tuple(k for k in c.get("label_keys", "").split(",") if k))

    @property
    def name(self) -> str:
        return f"{self.dataset.replace('/', '_')}-{self.split}"


@dataclasses.dataclass
class Memory:
    """A searchable memory: one or more stores (pieces), each with an index per searched modality."""

    name: str
    pieces: list[tuple[MemoryStore, dict[str, Index]]]

    @property
    def count(self) -> int:
        return sum(store.count for store, _ in self.pieces)

    def neighbours(self, queries: np.ndarray, k: int, mode: SearchMode) -> Neighbours:
        """Top-k over every piece (merged by score, ties by lower id), with the payload embeddings;
        ids are (piece << 40) + id so they stay unique across pieces."""
        if k > self.count:
            raise RetrievalError(f"k={k} exceeds the size {self.count} of memory {self.name}")
        parts = []
        for p, (store, indexes) in enumerate(self.pieces):
            scores, ids = indexes[mode.searched].search(queries, min(k, store.count))
            parts.append((scores, ids + (p << 40), gather_rows(store, mode.payload, ids)))
        scores, ids = merge_topk([s for s, _, _ in parts], [i for _, i, _ in parts], k)
        candidates = np.concatenate([i for _, i, _ in parts], axis=1)  # [q, k * pieces], unique per row
        position = np.argmax(candidates[:, None, :] == ids[:, :, None], axis=2)  # [q, k]
        emb = np.concatenate([e for _, _, e in parts], axis=1)
        return Neighbours(ids, scores, np.take_along_axis(emb, position[..., None], 1))


def _job_barrier():
    """The barrier every process of a JAX job meets at (None in a one-process job), for the
    collective builders (encode_memory, build_sharded_index, precompute_neighbours)."""
    import jax
    from jax.experimental import multihost_utils

    return multihost_utils.sync_global_devices if jax.process_count() > 1 else None


class Artefacts:
    """Builds (or finds) stores, indexes and neighbour shards under `root` for one encoder."""

    def __init__(self, root: str | os.PathLike, encoder: FrozenEncoder, *, data_dir: str | None = None,
                 world_seed: int = 0, batch_size: int = 256, shard_size: int = 4096, neighbour_shard_size: int = 4096,
                 index_kind: str = "exact",
                 index_params: Mapping[str, Any] | None = None, index_pieces: int = 1, progress: bool = True):
        self.encoder = encoder
        self.root = fs.join(root, encoder.fingerprint().replace(":", "-"))
        self.data_dir = data_dir or None
        self.world_seed = world_seed
        self.batch_size = batch_size
        self.shard_size = shard_size
        self.neighbour_shard_size = neighbour_shard_size
        self.index_kind = index_kind
        self.index_params = dict(index_params or {})
        self.index_pieces = int(index_pieces)
        self.progress = progress
        self._builders: dict[str, Any] = {}
        self._stores: dict[SplitSpec, MemoryStore] = {}
        self._indexes: dict[tuple[SplitSpec, str], Index] = {}

    # -- datasets ---------------------------------------------------------------------------

    def builder(self, dataset: str) -> Any:
        if dataset not in self._builders:
            self._builders[dataset] = open_builder(dataset, self.data_dir, self.world_seed)
        return self._builders[dataset]

    def store(self, spec: SplitSpec) -> MemoryStore:
        """The frozen embeddings (and label payloads) of every example of a split. Every JAX process
        must call this (the same specs, in the same order): each encodes its share of the shards."""
        if spec not in self._stores:
            import jax

            builder = self.builder(spec.dataset)
            directory = fs.join(self.root, "stores", f"{spec.name}-v{builder.version}")  # a new dataset version: new store
            encode_memory(self.encoder, builder, spec.split, directory,
                          image_key=spec.image_key, caption_key=spec.caption_key or None,
                          payload_keys=spec.label_keys, batch_size=self.batch_size,
                          shard_size=self.shard_size, progress=self.progress,
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          barrier=_job_barrier())
            self._stores[spec] = MemoryStore.open(directory)
        return self._stores[spec]

    def index(self, spec: SplitSpec, modality: str) -> Index | ShardedIndex:
        """A kNN index over one modality of a split's store, saved beside it and reloaded. Every JAX
        process calls this (the same specs, in the same order): with `index_pieces` = 1 process 0
        builds it while the others wait; with P > 1 pieces each process builds its share of them
        (retrieval.distributed.build_sharded_index) and every process loads them all."""
        key = (spec, modality)
        if key not in self._indexes:
            import jax

            from vlcore.training.mesh import process_zero_first

            store = self.store(spec)
            name = f"{fs.basename(store.directory)}-{modality}-{self.index_kind}"
            if self.index_pieces > 1:
                self._indexes[key] = build_sharded_index(
                    store, modality, fs.join(self.root, "index", f"{name}-p{self.index_pieces}"),
                    kind=self.index_kind, params=self.index_params, pieces=self.index_pieces,
                    process_index=jax.process_index(), process_count=jax.process_count(),
                    barrier=_job_barrier())
            else:
                self._indexes[key] = process_zero_first(
                    lambda: self._one_piece_index(store, modality, fs.join(self.root, "index", name)), f"index-{name}")
        return self._indexes[key]

    def _one_piece_index(self, store: MemoryStore, modality: str, directory: str) -> Index:
        try:
            return load_index(directory, store.fingerprint())
        except (RetrievalError, OSError, ValueError):
            index = make_index(self.index_kind, **self.index_params).build(
                np.asarray(store.embeddings(modality), np.float32), store.ids())
            index.save(directory, store.fingerprint())
            return index

    def memory(self, specs: Sequence[SplitSpec], name: str) -> Memory:
        pieces = []
        for spec in specs:
            store = self.store(spec)
            pieces.append((store, {m: self.index(spec, m) for m in store.modalities}))
        return Memory(name, pieces)

    # -- training neighbours ------------------------------------------------------------------

    def precompute(self, train: SplitSpec, memory: SplitSpec, mode_name: str, k: int,
                   duplicate_threshold: Mapping[str, float]) -> dict[str, str]:
        """{side: directory} of the training split's neighbours, precomputed once per side.

        When the training split is the memory itself, each pair's own entry is excluded; results
        above `duplicate_threshold[side]` (cosine in the searched modality) are dropped as
        near-duplicates. Every JAX process calls this: each searches and writes its share of
        the shards (retrieval.precompute), after the index is built (retrieval.index_pieces).
        """
        import jax

        from retrieval.precompute import precompute_neighbours

        if mode_name not in RECO_MODES:
            raise ValueError(f"retrieval mode {mode_name!r}: expected one of {sorted(RECO_MODES)}")
        train_store, memory_store = self.store(train), self.store(memory)  # collective: every process encodes
        out: dict[str, str] = {}
        for side in ("image", "text"):
            mode = RECO_MODES[mode_name][side]
            threshold = duplicate_threshold.get(side) or None
            directory = fs.join(self.root, "neighbours",
                                f"{fs.basename(train_store.directory)}--{fs.basename(memory_store.directory)}--"
                                f"{mode_name}-{side}-k{k}" + (f"-dup{threshold:g}" if threshold else "")
                                + (f"-p{self.index_pieces}" if self.index_pieces > 1 else ""))
            # What the neighbours were computed from, checked without reading the training split
            # (its embeddings would make host memory grow with the split on every rerun).
            source = {"train_store": train_store.fingerprint(), "memory_store": memory_store.fingerprint(),
                      "index": {"kind": self.index_kind, "params": self.index_params,
                                **({"pieces": self.index_pieces} if self.index_pieces > 1 else {})}}
            source_path = fs.join(directory, NEIGHBOUR_SOURCE_NAME)
            if fs.isfile(fs.join(directory, "manifest.json")) and fs.isfile(source_path) \
                    and json.loads(fs.read_text(source_path)) == source:
                out[side] = directory
                continue
            index = self.index(memory, mode.searched)  # collective: built by process 0 or in pieces by all
            queries = np.asarray(train_store.embeddings(side), np.float32)
            # The fields make the manifest's inputs checksum: a finished directory whose rows are
            # not this store's (another order, other embeddings) is refused, not read.
            precompute_neighbours(
                directory, index=index, store=memory_store, mode=mode, queries=queries, k=k,
                fields={"example_id": train_store.ids(), side: queries},
                exclude_ids=train_store.ids() if train == memory else None,
                duplicate_threshold=threshold, examples_per_shard=self.neighbour_shard_size, progress=self.progress,
                process_index=jax.process_index(), process_count=jax.process_count(),
                barrier=_job_barrier())
            if jax.process_index() == 0:
                atomic_write_json(source_path, source)
            out[side] = directory
        return out

    def train_rows(self, train: SplitSpec, memory: SplitSpec, mode_name: str, k: int,
                   duplicate_threshold: Mapping[str, float]) -> "TrainRows":
        """The fusion's training set streamed from the neighbour shards (host memory: a few batches)."""
        return TrainRows(self.precompute(train, memory, mode_name, k, duplicate_threshold))

    def train_arrays(self, train: SplitSpec, memory: SplitSpec, mode_name: str, k: int,
                     duplicate_threshold: Mapping[str, float]) -> dict[str, np.ndarray]:
        """{"image", "text" [n, d]; "image_neighbours", "text_neighbours" [n, k, d]; "image_neighbour_ids",
        "text_neighbour_ids" [n, k] (memory ids)} of the whole training split, in RAM (for analysis
        and tests; training streams through `train_rows`)."""
        from retrieval.neighbour_reader import read_all

        out: dict[str, np.ndarray] = {}
        for side, directory in self.precompute(train, memory, mode_name, k, duplicate_threshold).items():
            arrays = read_all(directory)
            out[side] = arrays[side]
            out[f"{side}_neighbours"] = arrays["neighbour_embeddings"]
            out[f"{side}_neighbour_ids"] = arrays["neighbour_ids"]
        return out


class TrainRows:
    """RECO's training rows, {"image", "text" [b, d]; "image_neighbours", "text_neighbours" [b, k, d]},
    read from the two sides' neighbour shards on demand (a `vlcore.training.input_order.RowSource`)."""

    keys = ("image", "image_neighbours", "text", "text_neighbours")

    def __init__(self, directories: Mapping[str, str]):
        from retrieval.neighbour_reader import NeighbourRows

        self.sides = {side: NeighbourRows(d, fields=(side, "neighbour_embeddings"))
                      for side, d in directories.items()}
        sizes = {side: len(rows) for side, rows in self.sides.items()}
        if len(set(sizes.values())) != 1:
            raise RetrievalError(f"neighbour precomputes of different sizes: {sizes}")

    def __len__(self) -> int:
        return len(next(iter(self.sides.values())))

    def read_rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for side, rows in self.sides.items():
            got = rows.read_rows(index)
            out[side], out[f"{side}_neighbours"] = got[side], got["neighbour_embeddings"]
        return out


def open_builder(dataset: str, data_dir: str | None, world_seed: int = 0) -> Any:
    """A prepared TFDS builder; the embedded world is generated on first use (nothing to download)."""
    import tensorflow_datasets as tfds

    from vlcore.tfds_pairs import PairDataError

    name, _, config = dataset.partition("/")
    if name == "vl_world":
        from vlcore.training.mesh import process_zero_first
        from vlcore.world import builder as world

        return process_zero_first(lambda: world.prepare(data_dir, config=config or "quick", seed=world_seed), "world")
    try:
        builder = tfds.builder(dataset, data_dir=data_dir)
    except Exception as e:  # TFDS raises several types for unknown names and configs
        raise PairDataError(f"dataset {dataset!r}: {e}") from None
    return builder  # an unprepared dataset is reported when its split is first read (vlcore.tfds_pairs)
