"""Training the world's frozen two-tower model on the training core (`vlcore.training.loop`).

Data flow: world (TFDS) -> web-split captions -> locked MiniLM embeddings (computed once, cached
beside the dataset) -> contrastive steps of the image tower -> zero-shot evaluation on the test
split (coarse categories and fine subtypes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlcore.atomic_files import atomic_output
from vlcore.clip_benchmark import class_embeddings, flatten_prompts, zero_shot_metrics
from vlcore.encoders.configs import CLIPVisionConfig
from vlcore.fixed_batches import map_fixed_batches
from vlcore.sentence_encoder import SentenceEncoder, bundled_minilm_path
from vlcore.tfds_arrays import split_arrays
from vlcore.training.config_check import Rule, int_at_least, is_int, one_of
from vlcore.training.mesh import process_zero_first
from vlcore.two_tower.model import TwoTower, two_tower_loss

log = logging.getLogger(__name__)


def vision_config(model: ml_collections.ConfigDict) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        image_size=model.image_size, patch_size=model.patch_size, num_channels=3,
        hidden_size=model.hidden_size, intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_hidden_layers, num_attention_heads=model.num_attention_heads,
        hidden_act="gelu", layer_norm_eps=1e-5,
    )


def cached_sentence_embeddings(sentences: np.ndarray, cache_dir: Path, encoder: SentenceEncoder,
                               tag: str) -> np.ndarray:
    """Embeddings of `sentences`, computed once and kept as .npy keyed by the sentences' hash."""
    digest = hashlib.sha256("\n".join(sentences).encode()).hexdigest()[:16]
    path = cache_dir / f"minilm-{tag}-{digest}.npy"
    if path.exists():
        cached = np.load(path)
        if cached.shape == (len(sentences), encoder.dim):
            return cached
    embeds = encoder.encode(list(sentences), progress=jax.process_index() == 0)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as f:
        np.save(f, embeds)
    return embeds


@dataclasses.dataclass
class TwoTowerTask:
    """The LiT-style task: image tower + temperature train against locked MiniLM caption embeddings."""

    config: ml_collections.ConfigDict

    def __post_init__(self):
        from vlcore.world import builder as world  # registers the TFDS builder

        cfg = self.config
        if not cfg.text_tower:
            bundled_minilm_path()  # a missing text tower is an error now, before any data is made
        self.vision = vision_config(cfg.model)
        self.module = TwoTower(self.vision, embed_dim=cfg.model.embed_dim)
        # Built once: a jax.jit made per call would trace and compile again every time.
        self._embed_fn = jax.jit(lambda p, x: self.module.apply({"params": p}, x, method=TwoTower.embed_images))
        self.builder = process_zero_first(
            lambda: world.prepare(cfg.world.data_dir or None, config=cfg.world.config, seed=cfg.world.seed), "world")
        self._encoder: SentenceEncoder | None = None
        self._arrays: dict[str, np.ndarray] | None = None

    @property
    def encoder(self) -> SentenceEncoder:
        if self._encoder is None:
            self._encoder = SentenceEncoder(self.config.text_tower or None)
        return self._encoder

    def fingerprint(self) -> dict[str, Any]:
        return {
            "model": "two_tower",
            "vision": dataclasses.asdict(self.vision),
            "embed_dim": self.config.model.embed_dim,
            "text_tower": self.config.text_tower or "bundled all-MiniLM-L6-v2",
        }

    def init_params(self, rng: jax.Array) -> Any:
        size = self.vision.image_size
        return self.module.init(rng, jnp.zeros((1, size, size, 3), jnp.uint8))["params"]

    def train_arrays(self) -> Mapping[str, np.ndarray]:
        if self._arrays is None:
            web = split_arrays(self.builder, "web", ["image", "caption"])
            cache = Path(self.builder.data_dir)
            text = process_zero_first(
                lambda: cached_sentence_embeddings(web["caption"], cache, self.encoder, "web"), "caption-embeddings")
            if text.shape[1] != self.config.model.embed_dim:
                raise ValueError(f"config.model.embed_dim {self.config.model.embed_dim} differs from the text "
                                 f"tower's width {text.shape[1]}")
            self._arrays = {"image": web["image"], "text_embedding": text}
        return self._arrays

    def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array,
             step: jax.Array) -> tuple[jax.Array, dict]:
        return two_tower_loss(self.module, params, batch)

    def embed_images(self, params: Any, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        if not len(images):
            return np.zeros((0, self.config.model.embed_dim), np.float32)
        return map_fixed_batches(lambda x: self._embed_fn(params, x), [images], batch_size)

    def evaluate(self, params: Any) -> dict[str, float]:
        """Zero-shot acc@1, acc@5 and mean per-class recall on the test split, coarse and fine."""
        from vlcore.world import taxonomy

        test = split_arrays(self.builder, "test", ["image", "fine_label", "coarse_label"])
        images = self.embed_images(jax.device_get(params), test["image"])
        out = {}
        for level in ("coarse", "fine"):
            prompts, counts = flatten_prompts(taxonomy.class_prompts(level))
            classes = class_embeddings(self.encoder.encode(prompts), counts)
            metrics = zero_shot_metrics(images @ classes.T, test[f"{level}_label"])
            out.update({f"{level}_{k}": v for k, v in metrics.items()})
        return out


def make_task(config: ml_collections.ConfigDict) -> TwoTowerTask:
    return TwoTowerTask(config)


def config_rules(config: ml_collections.ConfigDict) -> list[Rule]:
    """The two-tower task's value checks, run before anything is built."""
    from vlcore.world.builder import VlWorld

    m = config.model
    worlds = [c.name for c in VlWorld.BUILDER_CONFIGS]
    return [
        Rule("world.config", one_of(*worlds), f"one of {worlds}"),
        Rule("world.seed", int_at_least(0), "an integer >= 0"),
        Rule("model.image_size", int_at_least(1), "an integer >= 1"),
        Rule("model.patch_size", lambda v: is_int(v) and v >= 1 and m.image_size % v == 0,
             f"a positive divisor of model.image_size={m.image_size}"),
        Rule("model.hidden_size", lambda v: is_int(v) and v >= 1 and v % max(m.num_attention_heads, 1) == 0,
             f"a positive multiple of model.num_attention_heads={m.num_attention_heads}"),
        Rule("model.num_attention_heads", int_at_least(1), "an integer >= 1"),
        Rule("model.num_hidden_layers", int_at_least(1), "an integer >= 1"),
        Rule("model.intermediate_size", int_at_least(1), "an integer >= 1"),
        Rule("model.embed_dim", int_at_least(1), "an integer >= 1"),
    ]


def default_config() -> ml_collections.ConfigDict:
    """Every field the two-tower trainer reads, with the world's quick-preset values."""
    config = ml_collections.ConfigDict()
    config.task = "vlcore.two_tower.task"  # module with default_config() and make_task(config)
    config.name = "two_tower"
    config.seed = 0
    config.world = ml_collections.ConfigDict(dict(config="quick", seed=0, data_dir=""))  # "" = TFDS default dir
    config.text_tower = ""  # "" = the bundled all-MiniLM-L6-v2; or a local BERT-layout HF directory
    config.model = ml_collections.ConfigDict(dict(
        image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=256, embed_dim=384,
    ))
    config.batch_size = 256  # global, over all devices and processes
    config.num_steps = 400
    config.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", lr=2e-3, warmup_steps=40, schedule="cosine", weight_decay=1e-4, grad_clip_norm=1.0,
    ))
    config.fsdp = 1  # devices per FSDP group; 1 = pure data parallelism
    config.log_every = 25
    config.save_every = 100
    config.keep_checkpoints = 3
    config.async_checkpoints = True
    return config
