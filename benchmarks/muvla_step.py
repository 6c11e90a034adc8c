"""µ-VLA's and VisualBERT's train steps for `benchmarks.train_step`, and the same-size PyTorch steps.

Sizes (`SIZES`): "world" is the quick world preset (MiniLM's width, 2 layers, the corpus's 315
word pieces, 6 regions of 384-d crops, 16 tag word pieces, sentences of 24); "base" is the paper's
(BERT-base, 12 layers, BERT's 30,522 word pieces, VinVL's 2048-d features, 36 regions, 32 tag
word pieces, sentences of 36).

Rows:
  muvla_<size>             the Flax µ-VLA step: R-T, R-N and I-S (three passes of the
                           transformer) with the curriculum, MLM heads on the gathered masked
                           positions only; AdamW;
  muvla_<size>_torch       the same three passes through transformers' PyTorch
                           `VisualBertForPreTraining` on the same inputs and masks (HF's losses:
                           MLM logits over every position, ITM on the I-S pass); AdamW. It has
                           no box embedding and no region heads, so it does a little less;
  visualbert_<size>        one Flax `VisualBertForPreTraining` pass with HF's loss (MLM over all
                           positions + ITM): the like-for-like pair of
  visualbert_<size>_torch  the same step in PyTorch.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlcore.encoders.configs import VisualBertConfig


@dataclasses.dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    vocab: int
    feature_dim: int
    regions: int
    tag_tokens: int
    text: int
    k: int = 5
    phrases: int = 6
    classes: int = 6

    def config(self) -> VisualBertConfig:
        return VisualBertConfig(vocab_size=self.vocab, hidden_size=self.hidden, visual_embedding_dim=self.feature_dim,
                                intermediate_size=4 * self.hidden, num_hidden_layers=self.layers,
                                num_attention_heads=self.heads, pad_token_id=0)


SIZES = {"world": Size(384, 2, 12, 315, 384, 6, 16, 24, classes=6),
         "base": Size(768, 12, 12, 30522, 2048, 36, 32, 36, classes=1600)}
ADAMW = ml_collections.ConfigDict(dict(name="adamw", lr=5e-5, warmup_steps=0, schedule="constant",
                                       weight_decay=0.01, grad_clip_norm=1.0))
MASK_ID, CLS_ID, SEP_ID = 3, 1, 2  # special ids of the synthetic vocabulary (0 = padding)


def corpus_batch(size: Size, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A synthetic batch with the corpus's keys and shapes (`jaxmuvla.corpus`): every region real,
    sentences of random length with phrases inside them, each region matched to a phrase."""
    rng = np.random.default_rng(seed)
    b, r, k, length, p = batch, size.regions, size.k, size.text, size.phrases
    sentence = rng.integers(4, size.vocab, (b, k, length)).astype(np.int32)
    lengths = rng.integers(length // 2, length + 1, (b, k))
    position = np.arange(length)
    sentence[..., 0] = CLS_ID
    sentence[position >= lengths[..., None]] = 0
    sentence[np.arange(b)[:, None], np.arange(k), lengths - 1] = SEP_ID
    starts = 1 + np.sort(rng.integers(0, length // 2 - 3, (b, k, p)), axis=-1)
    spans = np.stack([starts, starts + 2], -1).astype(np.int32)
    return {
        "region_features": rng.standard_normal((b, r, size.feature_dim)).astype(np.float32),
        "region_boxes": rng.uniform(0, 1, (b, r, 5)).astype(np.float32),
        "region_class": rng.integers(0, size.classes, (b, r)).astype(np.int32),
        "tag_ids": rng.integers(4, size.vocab, (b, size.tag_tokens)).astype(np.int32),
        "tag_region": rng.integers(0, r, (b, size.tag_tokens)).astype(np.int32),
        "sentence_ids": sentence,
        "phrase_spans": spans,
        "region_phrase": rng.integers(0, p, (b, k, r)).astype(np.int32),
        "region_phrase_cos": rng.uniform(0.3, 1.0, (b, k, r)).astype(np.float32),
    }


def _tokens(size: Size):
    from jaxmuvla.objectives import Tokens

    return Tokens(cls=CLS_ID, sep=SEP_ID, mask=MASK_ID, pad=0, vocab_size=size.vocab)


def muvla_builder(size_name: str):
    """A `train_step.STEPS` builder of the Flax µ-VLA step (the curriculum on: its ITM weighting runs)."""
    def build(batch: int, mesh):
        from jaxmuvla.model import MuVLA, init_muvla
        from jaxmuvla.objectives import ObjectiveSettings, pretraining_loss

        size = SIZES[size_name]
        module = MuVLA(size.config(), size.classes)
        settings, tokens = ObjectiveSettings(k=size.k, curriculum_steps=0), _tokens(size)

        def loss_fn(params, inputs):
            return pretraining_loss(module.bind({"params": params}), inputs, jax.random.key(0), jnp.int32(1),
                                    settings, tokens)

        return lambda r: init_muvla(module), loss_fn, corpus_batch(size, batch), ADAMW, 1000
    return build


def hf_pass_inputs(size: Size, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One VisualBertForPreTraining pass: a sentence with 15 % of its word pieces masked, the regions,
    labels over text + regions (-100 = not predicted) and the 2-way sentence-image label."""
    rng = np.random.default_rng(seed)
    c = corpus_batch(size, batch, seed)
    ids = c["sentence_ids"][:, 0]
    masked = (ids > SEP_ID) & (rng.uniform(size=ids.shape) < 0.15)
    labels = np.full((batch, size.text + size.regions), -100, np.int64)
    labels[:, :size.text] = np.where(masked, ids, -100)
    return {"input_ids": np.where(masked, MASK_ID, ids).astype(np.int32), "attention_mask": (ids != 0).astype(np.int32),
            "visual_embeds": c["region_features"], "visual_attention_mask": np.ones((batch, size.regions), np.int32),
            "labels": labels, "sentence_image_labels": rng.integers(0, 2, batch).astype(np.int64)}


def hf_loss(prediction: jax.Array, itm: jax.Array, labels: jax.Array, itm_labels: jax.Array) -> jax.Array:
    """transformers' VisualBertForPreTraining loss: mean CE over labelled positions + ITM CE."""
    import optax

    valid = labels >= 0
    ce = optax.softmax_cross_entropy_with_integer_labels(prediction, jnp.maximum(labels, 0).astype(jnp.int32))
    mlm = (ce * valid).sum() / jnp.maximum(valid.sum(), 1)
    return mlm + optax.softmax_cross_entropy_with_integer_labels(itm, itm_labels.astype(jnp.int32)).mean()


def visualbert_builder(size_name: str):
    """A `train_step.STEPS` builder of one Flax VisualBertForPreTraining pass with HF's loss."""
    def build(batch: int, mesh):
        from vlcore.encoders.visual_bert import VisualBertForPreTraining

        size = SIZES[size_name]
        module = VisualBertForPreTraining(size.config())
        inputs = hf_pass_inputs(size, batch)

        def init(r):
            return module.init(r, jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32), None,
                               jnp.zeros((1, 1, size.feature_dim)), jnp.ones((1, 1), jnp.int32))["params"]

        def loss_fn(params, b):
            out = module.apply({"params": params}, b["input_ids"], b["attention_mask"], None, b["visual_embeds"],
                               b["visual_attention_mask"])
            loss = hf_loss(out["prediction_logits"], out["seq_relationship_logits"], b["labels"],
                           b["sentence_image_labels"])
            return loss, {}

        return init, loss_fn, inputs, ADAMW, 1000
    return build


def _torch_model(size: Size):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = size.config()
    hf = transformers.VisualBertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                       visual_embedding_dim=cfg.visual_embedding_dim,
                                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                                       num_attention_heads=cfg.num_attention_heads, pad_token_id=0)
    model = transformers.VisualBertForPreTraining(hf).train()
    for module in model.modules():  # dropout off, as in the Flax step (deterministic)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def muvla_torch_passes(size: Size, batch: int) -> list[dict[str, np.ndarray]]:
    """The three µ-VLA passes as VisualBertForPreTraining inputs (same layouts as the Flax step):
    R-T [CLS] tags [SEP] + regions (tag MLM), R-N a sentence + regions (phrase MLM), I-S a sentence
    + regions (MLM + ITM)."""
    rng = np.random.default_rng(1)
    c = corpus_batch(size, batch)
    tags = np.concatenate([np.full((batch, 1), CLS_ID), c["tag_ids"], np.full((batch, 1), SEP_ID)], 1)
    passes = []
    for ids, itm in ((tags, False), (c["sentence_ids"][:, 0], False), (c["sentence_ids"][:, 1], True)):
        masked = (ids > SEP_ID) & (rng.uniform(size=ids.shape) < 0.15)
        labels = np.full((batch, ids.shape[1] + size.regions), -100, np.int64)
        labels[:, :ids.shape[1]] = np.where(masked, ids, -100)
        p = {"input_ids": np.where(masked, MASK_ID, ids).astype(np.int64), "attention_mask": (ids != 0).astype(np.int64),
             "visual_embeds": c["region_features"], "visual_attention_mask": np.ones((batch, size.regions), np.int64),
             "labels": labels}
        if itm:
            p["sentence_image_labels"] = rng.integers(0, 2, batch).astype(np.int64)
        passes.append(p)
    return passes


def torch_step_seconds(kind: str, size_name: str, batch: int, iters: int) -> tuple[float, float]:
    """(median seconds, FLOPs) of one PyTorch step: forward, backward, AdamW. kind "muvla": the
    three passes of `muvla_torch_passes`, "visualbert": the one pass of `hf_pass_inputs`."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    size = SIZES[size_name]
    model = _torch_model(size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    passes = muvla_torch_passes(size, batch) if kind == "muvla" else [hf_pass_inputs(size, batch)]
    passes = [{k: torch.from_numpy(np.asarray(v, np.int64 if k != "visual_embeds" else np.float32))
               for k, v in p.items()} for p in passes]

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = sum(model(**p).loss for p in passes)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = float(counter.get_total_flops())
    step()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), flops


STEPS = {f"{kind}_{size}": builder(size) for size in SIZES
         for kind, builder in (("muvla", muvla_builder), ("visualbert", visualbert_builder))}
TORCH_STEPS = {f"{name}_torch": name for name in STEPS}
