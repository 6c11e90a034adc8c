"""RECO on the training core: frozen encoder + memory + precomputed neighbours -> trained fusion.

    python -m vlcore.main --config=configs/reco_world.py --workdir=out/reco

Data flow (all of it cached by `jaxreco.data.Artefacts`, see there): frozen encoder (the world's
two-tower work dir, or an HF CLIP directory) -> memory store of the memory split -> index ->
neighbours of every training pair (uni-modal search, cross-modal payload by default) ->
training arrays -> `vlcore.training.loop.train` (mesh, checkpoints, resume, TensorBoard) with
RECO's three-term loss; only φ_image, φ_text and the temperature train -> evaluation on the
configured zero-shot and retrieval tasks, with the fusion refining the configured sides.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from jaxreco import online_retrieval
from jaxreco.data import Artefacts, Memory, SplitSpec, TrainRows
from jaxreco.evaluate import Refiner, evaluate
from jaxreco.fusion import FusionConfig
from jaxreco.model import Reco, init_params, make_refine_fn, reco_batch_loss
from jaxreco.prompts import PROMPT_SETS
from vlcore.training.config_check import Rule, int_at_least, is_int, number_in, one_of, positive_number


def fusion_config(config: ml_collections.ConfigDict, dim: int) -> FusionConfig:
    f = config.fusion
    return FusionConfig(dim=dim, width=f.width or dim, num_heads=f.num_heads, mlp_ratio=f.mlp_ratio, k=f.k,
                        residual=f.residual, gate_init=f.gate_init)


def make_artefacts(config: ml_collections.ConfigDict, encoder: Any = None) -> Artefacts:
    from vlcore.frozen_encoders import load_frozen_encoder

    encoder = encoder or load_frozen_encoder(config.encoder, batch_size=config.encode_batch_size)
    return Artefacts(config.artefacts_dir, encoder, data_dir=config.data_dir or None, world_seed=config.world_seed,
                     batch_size=config.encode_batch_size, shard_size=config.encode_shard_size,
                     neighbour_shard_size=config.neighbour_shard_size,
                     index_kind=config.retrieval.index, index_pieces=config.retrieval.index_pieces,
                     progress=jax.process_index() == 0)


def memory_specs(config: ml_collections.ConfigDict, name: str) -> list[SplitSpec]:
    """The memory evaluated with: "" = the training memory, else one of config.eval_memories."""
    if not name:
        return [SplitSpec.from_config(config.memory)]
    if name not in config.eval_memories:
        raise ValueError(f"eval memory {name!r}: expected '' or one of {sorted(config.eval_memories)}")
    return [SplitSpec.from_config(c) for c in config.eval_memories[name]]


@dataclasses.dataclass
class RecoTask:
    config: ml_collections.ConfigDict
    artefacts: Artefacts | None = None

    def __post_init__(self):
        cfg = self.config
        if self.artefacts is None:
            self.artefacts = make_artefacts(cfg)
        self.fusion = fusion_config(cfg, self.artefacts.encoder.dim)
        self.module = Reco(self.fusion, cfg.fusion.kind)
        self.memory_spec = SplitSpec.from_config(cfg.memory)
        self.train_spec = SplitSpec.from_config(cfg.train_data)
        self._rows: TrainRows | None = None
        self.last_per_example: dict[str, np.ndarray] = {}

    def fingerprint(self) -> dict[str, Any]:
        fusion = {k: str(v) if k == "dtype" else v for k, v in dataclasses.asdict(self.fusion).items()}
        # The stores' own fingerprints (their manifests, checksums included): a work dir trained
        # on another version of the data is refused, not resumed.
        stores = {name: self.artefacts.store(spec).fingerprint() for name, spec in
                  (("memory", self.memory_spec), ("train_data", self.train_spec))}
        return {"model": "reco", "kind": self.config.fusion.kind, "fusion": fusion,
                "encoder": self.artefacts.encoder.fingerprint(), "memory": dataclasses.asdict(self.memory_spec),
                "train_data": dataclasses.asdict(self.train_spec), "mode": self.config.retrieval.mode,
                "stores": stores}

    def init_params(self, rng: jax.Array) -> Any:
        return init_params(self.module, rng, self.fusion.dim, self.fusion.k)

    def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array,
             step: jax.Array) -> tuple[jax.Array, dict]:
        if self.config.retrieval.online:  # the batch holds queries and the memory: search, then the loss
            return online_retrieval.reco_online_loss(self.module, params, self._online, batch)
        return reco_batch_loss(self.module, params, batch)

    def device_arrays(self, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
        """The memory, sharded over `mesh`, when retrieval is online (the loop passes it to every step)."""
        if not self.config.retrieval.online:
            return {}
        r = self.config.retrieval
        self._online = online_retrieval.build(
            self.artefacts, self.memory_spec, mesh, r.mode, self.fusion.k, r.index,
            {"image": r.duplicate_threshold_image, "text": r.duplicate_threshold_text})
        return self._online.device_arrays()

    def train_arrays(self) -> TrainRows:
        """The training rows, streamed from the precomputed neighbour shards (every process
        precomputes its share of them first)."""
        if self.config.retrieval.online:  # no precompute: the queries only, searched in the step
            return online_retrieval.train_arrays(self.artefacts, self.train_spec, self.memory_spec)
        if self._rows is None:
            r = self.config.retrieval
            self._rows = self.artefacts.train_rows(
                self.train_spec, self.memory_spec, r.mode, self.fusion.k,
                {"image": r.duplicate_threshold_image, "text": r.duplicate_threshold_text})
        return self._rows

    def eval_memory(self, name: str | None = None) -> Memory:
        name = self.config.eval.memory if name is None else name
        specs = memory_specs(self.config, name)
        # Collective: every process encodes its share of the stores and builds its share of the
        # indexes' pieces (or waits for process 0's one-piece index), then loads them.
        return self.artefacts.memory(specs, name or "train")

    def refiner(self, params: Any) -> Refiner:
        from vlcore.training.loop import params_to_host

        host = params_to_host(params)
        return Refiner(make_refine_fn(self.module, host, "image"), make_refine_fn(self.module, host, "text"))

    def evaluate(self, params: Any, *, refiner: Refiner | None = None, memory_name: str | None = None) -> dict[str, float]:
        """The configured evaluations; the per-example top-1 hits of the zero-shot tasks are kept in
        `self.last_per_example` (the loop records scalars only; the ablations compare models by them)."""
        refiner = refiner or self.refiner(params)
        memory = self.eval_memory(memory_name)
        # The evaluation splits' stores (every process encodes its share); then every process
        # evaluates, each searching and refining its share of the queries (jaxreco.evaluate).
        specs = {SplitSpec.from_config(t): None for group in ("zero_shot", "retrieval")
                 for t in self.config.eval.get(group, ())}  # a dict: the same order on every process
        for spec in specs:
            self.artefacts.store(spec)
        per_example: dict[str, np.ndarray] = {}
        metrics = evaluate(self.artefacts, self.config.eval, refiner, memory, self.fusion.k,
                           self.config.retrieval.mode, per_example)
        self.last_per_example = per_example
        return metrics


def make_task(config: ml_collections.ConfigDict) -> RecoTask:
    return RecoTask(config)


def config_rules(config: ml_collections.ConfigDict) -> list[Rule]:
    """RECO's value checks, run before anything is built (see vlcore.training.config_check)."""
    from jaxreco.model import FUSION_KINDS
    from retrieval.backends import KINDS
    from retrieval.search import RECO_MODES

    f, r = config.fusion, config.retrieval
    heads_divide = lambda w: is_int(w) and w >= 0 and (w == 0 or w % max(f.num_heads, 1) == 0)  # noqa: E731
    return [
        Rule("encoder", lambda v: v.partition(":")[0] in ("two_tower", "hf_clip") and bool(v.partition(":")[2]),
             "'two_tower:WORKDIR' or 'hf_clip:DIR'"),
        Rule("encode_batch_size", int_at_least(1), "an integer >= 1"),
        Rule("encode_shard_size", lambda v: is_int(v) and v >= 1 and v % config.encode_batch_size == 0,
             f"a positive multiple of encode_batch_size={config.encode_batch_size}"),
        Rule("neighbour_shard_size", int_at_least(1), "an integer >= 1"),
        Rule("world_seed", int_at_least(0), "an integer >= 0"),
        Rule("fusion.kind", one_of(*FUSION_KINDS), f"one of {list(FUSION_KINDS)}"),
        Rule("fusion.k", int_at_least(1), "an integer >= 1 (neighbours per query)"),
        Rule("fusion.num_heads", int_at_least(1), "an integer >= 1"),
        Rule("fusion.width", heads_divide, f"0 (= the embedding dim) or a positive multiple of num_heads={f.num_heads}"),
        Rule("fusion.mlp_ratio", positive_number, "a number > 0"),
        Rule("fusion.gate_init", lambda v: isinstance(v, (int, float)), "a number"),
        Rule("retrieval.mode", one_of(*RECO_MODES), f"one of {sorted(RECO_MODES)}"),
        Rule("retrieval.index", one_of(*KINDS), f"one of {list(KINDS)}"),
        Rule("retrieval.index_pieces", int_at_least(1), "an integer >= 1 (pieces of each index)"),
        Rule("retrieval.duplicate_threshold_image", number_in(0.0, 1.0), "a cosine in [0, 1] (0 = off)"),
        Rule("retrieval.duplicate_threshold_text", number_in(0.0, 1.0), "a cosine in [0, 1] (0 = off)"),
        Rule("retrieval.online", lambda v: v is False or (v is True and f.kind == "transformer"
                                                          and r.index in online_retrieval.INDEX_KINDS),
             f"False, or True with fusion.kind 'transformer' (not {f.kind!r}) and retrieval.index one of "
             f"{list(online_retrieval.INDEX_KINDS)} (not {r.index!r})"),
        Rule("eval.memory", lambda v: v == "" or (v in config.eval_memories and len(config.eval_memories[v]) > 0),
             f"'' (the training memory) or a non-empty entry of config.eval_memories {sorted(config.eval_memories)}"),
        Rule("eval.zero_shot", lambda tasks: all(t["prompts"] in PROMPT_SETS and t.get("label_key") for t in tasks),
             f"tasks with a label_key and prompts from {list(PROMPT_SETS)}"),
        Rule("eval.retrieval", lambda tasks: all(t.get("match", "pair") == "pair" or (t["match"] == "label"
                                                                                    and t.get("label_key"))
                                                 for t in tasks),
             "tasks with match 'pair', or 'label' and a label_key"),
    ]


def world_split(split: str, world: str = "quick", **kw) -> dict:
    return dict(dataset=f"vl_world/{world}", split=split, image_key="image", caption_key="caption", label_keys="",
                **kw)


TEST = world_split("test") | {"label_keys": "fine_label,coarse_label"}


def default_config() -> ml_collections.ConfigDict:
    """Every field the RECO trainer reads, with the embedded world's quick-preset values.

    As in the paper, the fusion trains on pairs whose neighbours come from those pairs themselves
    (each pair's own entry excluded), and is evaluated with another memory (the world's memory
    split, which names all 30 subtypes; the training pairs show 18 of them).
    """
    c = ml_collections.ConfigDict()
    c.task = "jaxreco.task"
    c.name = "reco"
    c.seed = 0
    c.encoder = "two_tower:out/two_tower"  # two_tower:WORKDIR (trained by vlcore.main) or hf_clip:DIR
    c.artefacts_dir = "out/reco_data"  # memory stores, indexes, precomputed neighbours
    c.data_dir = "out/tfds"  # TFDS data dir ("" = TFDS's default)
    c.world_seed = 0
    c.encode_batch_size = 256
    c.encode_shard_size = 4096
    c.neighbour_shard_size = 4096  # training pairs per neighbour shard: the unit each process precomputes
    c.train_data = world_split("fusion_train")
    c.memory = world_split("fusion_train")  # searched for the training neighbours (= train_data: self-retrieval)
    c.eval = ml_collections.ConfigDict(dict(
        memory="test_time",  # a name in eval_memories, or "" = the training memory
        # One split spec (dataset, split, keys) shared by the tasks on it: encoded once.
        zero_shot=[
            dict(name="fine", **TEST, label_key="fine_label", prompts="world_fine", refine_image=True, refine_text=True),
            dict(name="coarse", **TEST, label_key="coarse_label", prompts="world_coarse", refine_image=True,
                 refine_text=True),
        ],
        # The world's test captions name a subtype and little else, so a caption does not single out
        # its image: a hit is any result of the query's fine subtype (Recall@k as on CUB and Cars).
        # Refining only the image side is the paper's choice for retrieval; "both_" refines the
        # text queries too (the paper found that can hallucinate).
        retrieval=[dict(name="", **TEST, match="label", label_key="fine_label", refine_image=True, refine_text=False),
                   dict(name="both_", **TEST, match="label", label_key="fine_label", refine_image=True,
                        refine_text=True)],
    ))
    c.eval_memories = ml_collections.ConfigDict(dict(
        test_time=[world_split("memory")],  # the memory evaluated with: all 30 subtypes, named
        swap=[world_split("fusion_train")],  # the training pairs instead (they lack 12 subtypes)
        enlarged=[world_split("memory"), world_split("fusion_train")],
    ))
    c.retrieval = ml_collections.ConfigDict(dict(
        mode="uni_modal_search",  # or cross_modal_search / uni_modal_fusion (retrieval.search.RECO_MODES)
        # Any retrieval.backends kind (exact, faiss_flat, faiss_hnsw, scann, jax_exact, ...). faiss_flat is
        # exact inner-product search like `exact` (BLAS + a heap, ~3x faster than the numpy oracle on
        # 2 cores; ties between equal scores in either order).
        index="faiss_flat",
        # The index in this many pieces (contiguous runs of the memory store's shards), piece j built by
        # process j mod (process count) and searched by every process, the k best merged: index
        # building split across a job's hosts. Exact kinds give the same neighbours for any value.
        index_pieces=1,
        # Training neighbours scoring above these cosines count as near-duplicates and are dropped (0 = off).
        # Off for the world: its memory and fusion_train splits are generated independently.
        duplicate_threshold_image=0.0,
        duplicate_threshold_text=0.0,
        # Search the memory on the devices inside each train step (index jax_exact/jax_approx) instead
        # of precomputing every pair's neighbours: for a memory too big to precompute against, or changing.
        online=False,
    ))
    c.fusion = ml_collections.ConfigDict(dict(
        kind="transformer", width=0, num_heads=4, mlp_ratio=2.0, k=10, residual=True, gate_init=1.0,
    ))  # width 0 = the embedding dim
    c.batch_size = 256
    c.num_steps = 600
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", lr=3e-4, warmup_steps=60, schedule="cosine", weight_decay=1e-4, grad_clip_norm=1.0,
    ))
    c.fsdp = 1
    c.log_every = 50
    c.save_every = 200
    c.keep_checkpoints = 2
    c.async_checkpoints = True
    return c
