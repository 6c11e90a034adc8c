"""µ-VLA's network: transformers' VisualBERT with µ-VLA's additions, initialised from a BERT.

`MuVLA` holds `visual_bert` (vlcore's HF-compatible `VisualBertModel`) and `cls` (the tied MLM
head and the 2-way image-text head, laid out as HF's `VisualBertForPreTraining`), so those
keep HF's names and shapes (`vlcore.hf_checkpoint` reads and writes that layout); and µ-VLA's
own parts:

  * `box_embedding`: LN(Linear(box5)) added to every region token and to every tag word piece
    (the tag carries its region's box);
  * `region_heads`: MRC (a detector class per region) and MRFR (the region's feature back).

p-MRTC uses the tied MLM head on the region tokens (a region predicts a word of its phrase).
The methods (`encode`, `mlm_logits`, `itm_logits`, `region_class_logits`, `region_features`)
are what `jaxmuvla.objectives` calls on the bound module, so the vocabulary-sized head only ever
sees the gathered masked positions.

Dropout is VisualBERT's (the config's `hidden_dropout_prob` / `attention_probs_dropout_prob`, from
the checkpoint's config.json) and only in the encoder: `encode(..., deterministic=False)` with
rngs={"dropout": key} is training mode. The heads have none, as transformers' pre-training heads.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict

from vlcore.encoders.bert import BertMLMHead, BertPredictionTransform
from vlcore.encoders.configs import VisualBertConfig, with_dropout
from vlcore.encoders.layers import dense, layer_norm
from vlcore.encoders.visual_bert import VisualBertModel

log = logging.getLogger(__name__)


class PretrainingHeads(nn.Module):
    """HF's `cls` of VisualBertForPreTraining: `predictions` (tied MLM) and `seq_relationship`."""

    config: VisualBertConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.predictions = BertMLMHead(self.config.bert, self.dtype)
        self.seq_relationship = nn.Dense(2, dtype=self.dtype, param_dtype=jnp.float32)

    def mlm(self, hidden: jax.Array, word_embeddings: nn.Embed) -> jax.Array:
        return self.predictions(hidden, word_embeddings)

    def itm(self, pooled: jax.Array) -> jax.Array:
        return self.seq_relationship(pooled)


class BoxEmbedding(nn.Module):
    """box5 [..., 5] -> LN(Linear(box5)) [..., hidden]."""

    hidden_size: int
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, boxes: jax.Array) -> jax.Array:
        return layer_norm(self.eps, "LayerNorm", self.dtype)(dense(self.hidden_size, "dense", self.dtype)(boxes))


class RegionHeads(nn.Module):
    """MRC and MRFR over region tokens: each a BERT prediction transform (dense, activation,
    LayerNorm) then a linear map, to the detector classes or to the feature."""

    config: VisualBertConfig
    num_classes: int
    feature_dim: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.class_transform = BertPredictionTransform(self.config.bert, self.dtype)
        self.class_out = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32)
        self.feature_transform = BertPredictionTransform(self.config.bert, self.dtype)
        self.feature_out = nn.Dense(self.feature_dim, dtype=self.dtype, param_dtype=jnp.float32)

    def classes(self, hidden: jax.Array) -> jax.Array:
        return self.class_out(self.class_transform(hidden))

    def features(self, hidden: jax.Array) -> jax.Array:
        return self.feature_out(self.feature_transform(hidden))


def encode(visual_bert: VisualBertModel, box_embedding: BoxEmbedding | None, pooling: str, input_ids: jax.Array,
           attention_mask: jax.Array, token_boxes: jax.Array | None, token_box_mask: jax.Array | None,
           features: jax.Array, boxes: jax.Array, region_mask: jax.Array,
           deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """µ-VLA's single-stream pass (`MuVLA.encode`), shared with the downstream models so that a
    pre-trained `visual_bert` and `box_embedding` mean the same thing after fine-tuning.
    deterministic=False applies VisualBERT's dropout (the box embedding is added before the
    embedding LayerNorm, so the embedding dropout covers it too)."""
    text_extra = visual_extra = None
    if box_embedding is not None:
        visual_extra = box_embedding(boxes)
        if token_boxes is not None:
            text_extra = box_embedding(token_boxes) * token_box_mask[..., None].astype(visual_extra.dtype)
    out = visual_bert(input_ids, attention_mask.astype(jnp.int32), None, features, region_mask.astype(jnp.int32),
                      None, text_extra, visual_extra, deterministic)
    hidden = out["last_hidden_state"]
    if pooling == "mean":  # every real token's hidden state, averaged, through the same pooler
        real = jnp.concatenate([attention_mask, region_mask], axis=1).astype(hidden.dtype)[..., None]
        mean = (hidden * real).sum(1, keepdims=True) / jnp.maximum(real.sum(1, keepdims=True), 1.0)
        return hidden, visual_bert.pooler(mean)
    return hidden, out["pooler_output"]


class MuVLA(nn.Module):
    """Single-stream VisualBERT with µ-VLA's box embeddings and region heads (see the module docstring)."""

    config: VisualBertConfig
    num_classes: int
    box_embeddings: bool = True
    pooling: str = "cls"  # "cls": VisualBERT's pooler on token 0; "mean": the same pooler on the mean of all tokens
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.visual_bert = VisualBertModel(cfg, True, self.dtype)
        self.cls = PretrainingHeads(cfg, self.dtype)
        if self.box_embeddings:
            self.box_embedding = BoxEmbedding(cfg.hidden_size, cfg.layer_norm_eps, self.dtype)
        self.region_heads = RegionHeads(cfg, self.num_classes, cfg.visual_embedding_dim, self.dtype)

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array, token_boxes: jax.Array | None,
               token_box_mask: jax.Array | None, features: jax.Array, boxes: jax.Array,
               region_mask: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """Text [b, Lt] (token_boxes [b, Lt, 5] with token_box_mask [b, Lt]: the tag word pieces'
        boxes, or None) and regions (features [b, R, D], boxes [b, R, 5], region_mask [b, R]) ->
        (hidden [b, Lt + R, H], pooled [b, H]). deterministic=False: with dropout (training)."""
        return encode(self.visual_bert, self.box_embedding if self.box_embeddings else None, self.pooling,
                      input_ids, attention_mask, token_boxes, token_box_mask, features, boxes, region_mask,
                      deterministic)

    def mlm_logits(self, hidden: jax.Array) -> jax.Array:
        """[..., H] -> [..., vocab_size] through the MLM head tied to the word embeddings."""
        return self.cls.mlm(hidden, self.visual_bert.embeddings.word_embeddings)

    def itm_logits(self, pooled: jax.Array) -> jax.Array:
        return self.cls.itm(pooled)

    def region_class_logits(self, hidden_regions: jax.Array) -> jax.Array:
        return self.region_heads.classes(hidden_regions)

    def region_features(self, hidden_regions: jax.Array) -> jax.Array:
        return self.region_heads.features(hidden_regions)

    def __call__(self, input_ids, attention_mask, features, boxes, region_mask, deterministic: bool = True):
        """Every head once (for init): hidden, MLM logits, ITM logits, MRC and MRFR outputs."""
        hidden, pooled = self.encode(input_ids, attention_mask, None, None, features, boxes, region_mask,
                                     deterministic)
        regions = hidden[:, input_ids.shape[1]:]
        return (hidden, self.mlm_logits(hidden[:, :1]), self.itm_logits(pooled), self.region_class_logits(regions),
                self.region_features(regions))

    def describe(self) -> dict[str, Any]:
        return {"config": dataclasses.asdict(self.config), "num_classes": self.num_classes,
                "box_embeddings": self.box_embeddings, "pooling": self.pooling}


@dataclasses.dataclass
class MuVLACheckpoint:
    """A MuVLA module, its parameters and the tokenizer of the text checkpoint it started from."""

    module: MuVLA
    params: Any
    tokenizer: Any


def balance_fresh_embeddings(params: dict[str, np.ndarray], fresh: set[str], feature_norm: float) -> None:
    """Starts the freshly initialised embeddings at the scale of the checkpoint's word embeddings, in
    place (flat "/"-joined keys): the box embedding's LayerNorm scale and the visual projection.

    Every token's embeddings are summed before one LayerNorm, so what counts is their balance within
    a token. A BERT word embedding has norm ~1 (all-MiniLM-L6-v2: 1.07); a LayerNorm output with
    scale 1 has norm sqrt(hidden) (19.6 at 384). Left so, a tag word piece (word + its region's box)
    is ~95 % box after the LayerNorm: the model can hardly tell which word it is, and a masked
    region cannot find its class word among the tags (held-out MRC stayed at the class prior).
    The visual projection is scaled so that features of norm `feature_norm` in a random direction
    come out at that norm too, so a region is projection + box in equal parts. Only fresh tensors change: a
    trained VisualBERT's projection is left as it is."""
    words = np.asarray(params["visual_bert/embeddings/word_embeddings/embedding"], np.float32)
    text_norm = float(np.linalg.norm(words, axis=1).mean())
    box_scale = "box_embedding/LayerNorm/scale"
    if box_scale in fresh:
        params[box_scale] = np.full_like(params[box_scale], text_norm / np.sqrt(words.shape[1]))
    projection = "visual_bert/embeddings/visual_projection/kernel"
    if projection in fresh and feature_norm > 0:
        kernel = np.asarray(params[projection], np.float32)  # [features, hidden]
        gain = np.linalg.norm(kernel) / np.sqrt(kernel.shape[0])  # E|x W| = |x| * gain for a random direction x
        params[projection] = kernel * np.float32(text_norm / (feature_norm * gain))


def init_muvla(module: MuVLA, seed: int = 0) -> Any:
    cfg = module.config
    ids = jnp.zeros((1, 2), jnp.int32)
    return jax.jit(module.init)(jax.random.key(seed), ids, jnp.ones((1, 2), bool),
                                jnp.zeros((1, 1, cfg.visual_embedding_dim)), jnp.zeros((1, 1, 5)),
                                jnp.ones((1, 1), bool))["params"]


def load_text_tokenizer(directory: str | Path) -> Any:
    """The tokenizer of a BERT/VisualBERT directory, refused when it has word pieces the word
    embeddings lack: config.json's vocab_size rows (the strict loader holds the weights to it).
    A table larger than the tokenizer is allowed (some checkpoints pad it, as transformers allows)."""
    from vlcore.hf_checkpoint import CheckpointError, load_tokenizer, read_hf_config

    rows = read_hf_config(Path(directory)).vocab_size
    tokenizer = load_tokenizer(directory)
    if len(tokenizer) > rows:
        raise CheckpointError(f"{directory}: its tokenizer has {len(tokenizer)} word pieces, but its word embeddings "
                              f"only {rows} rows (config.json vocab_size): ids >= {rows} would have no embedding. "
                              "The vocabulary files (vocab.txt, tokenizer.json) and config.json come from different "
                              "checkpoints, or one of them was edited")
    return tokenizer


def muvla_from_text_checkpoint(path: str | None, *, num_layers: int, feature_dim: int, num_classes: int,
                               max_text_length: int, box_embeddings: bool = True, seed: int = 0,
                               vocabulary=None, pooling: str = "cls", dropout: float | None = None,
                               feature_norm: float | None = None) -> MuVLACheckpoint:
    """MuVLA initialised from a BERT (or VisualBERT) HF directory (None: the bundled MiniLM).

    The text embeddings, the first `num_layers` transformer layers (0 = all), the pooler and the
    MLM head come from the checkpoint when it has them (the visual token-type and position tables
    are copied from the text ones, as transformers' special_visual_initialize); everything else
    (visual projection, box embedding, region heads, a missing MLM or ITM head) is initialised,
    and said so in one log line. vocabulary: a `jaxmuvla.vocabulary.Vocabulary` to cut the word
    embeddings and the MLM head to (None: the checkpoint's whole vocabulary). Refused (CheckpointError)
    before any weight is read: a tokenizer with word pieces the embeddings lack, a VisualBERT whose
    visual_embedding_dim is not feature_dim. dropout: both of the encoder's dropout rates (None: the
    checkpoint's config.json `hidden_dropout_prob` / `attention_probs_dropout_prob`). feature_norm:
    the mean norm of the region features the model will read; given, the freshly initialised
    embeddings start at the text embeddings' scale (`balance_fresh_embeddings`).
    """
    from vlcore.hf_checkpoint import CheckpointError, read_hf_config, visual_bert_from_bert
    from vlcore.sentence_encoder import bundled_minilm_path

    directory = path or str(bundled_minilm_path())
    tokenizer = load_text_tokenizer(directory)  # before the weights: the cheap checks first
    width = getattr(read_hf_config(directory), "visual_embedding_dim", None)  # a VisualBERT directory's
    if width is not None and width != feature_dim:
        raise CheckpointError(f"{directory}: a VisualBERT with visual_embedding_dim {width}, but the corpus's region "
                              f"features are {feature_dim} wide: its visual projection takes {width}-wide regions. "
                              f"Use a corpus of {width}-wide features, or start from a BERT directory (the "
                              f"projection is then initialised for {feature_dim})")
    source = visual_bert_from_bert(directory, visual_embedding_dim=feature_dim, task="pretraining")
    cfg = source.config
    if num_layers:
        if num_layers > cfg.num_hidden_layers:
            raise CheckpointError(f"config.model.num_layers={num_layers}: the checkpoint at {directory} has only "
                                  f"{cfg.num_hidden_layers} layers")
        cfg = dataclasses.replace(cfg, num_hidden_layers=num_layers)
    if max_text_length > cfg.max_position_embeddings:
        raise CheckpointError(f"{directory}: max_position_embeddings {cfg.max_position_embeddings} is shorter than "
                              f"the corpus's text ({max_text_length} word pieces)")
    cfg = with_dropout(cfg, dropout)
    loaded_params = jax.device_get(source.params)
    if vocabulary is not None:
        from jaxmuvla.vocabulary import restrict_params

        loaded_params = restrict_params(loaded_params, vocabulary)
        cfg = dataclasses.replace(cfg, vocab_size=vocabulary.size)
    module = MuVLA(cfg, num_classes, box_embeddings, pooling)
    params = flatten_dict(jax.device_get(init_muvla(module, seed)), sep="/")
    loaded = flatten_dict(loaded_params, sep="/")
    copied = []
    for key, value in loaded.items():
        if key in params:
            if params[key].shape != np.shape(value):
                raise CheckpointError(f"{directory}: {key} has shape {np.shape(value)}, the model {params[key].shape}")
            params[key] = np.asarray(value)
            copied.append(key)
    if feature_norm is not None:
        fresh = set(params) - set(loaded)
        if width is None:  # a BERT directory: visual_bert_from_bert initialised the projection
            fresh |= {k for k in params if "/visual_projection/" in k}
        balance_fresh_embeddings(params, fresh, feature_norm)
    fresh = sorted({k.split("/")[0] if k.split("/")[0] != "cls" else "/".join(k.split("/")[:2])
                    for k in params if k not in loaded})
    log.warning("µ-VLA from %s: %d tensors copied; initialised: %s", directory, len(copied), ", ".join(fresh))
    return MuVLACheckpoint(module, unflatten_dict(params, sep="/"), tokenizer)
