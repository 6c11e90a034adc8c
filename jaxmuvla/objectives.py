"""µ-VLA's three pre-training objectives and the ITM curriculum on one batch of the corpus.

Each objective builds its own input layout from the corpus arrays (`jaxmuvla.corpus`), masks it
(`jaxmuvla.masking`, with uniforms drawn from the step's key) and returns per-example losses
(`jaxmuvla.losses`), so the curriculum can weight each example (b examples; R regions, T tag
word pieces, K sentences of L word pieces, P phrases):

  * R-T (region-tag):        [CLS] tags [SEP] + regions; tag MLM and masked regions (MRC + MRFR
                             toward the original feature);
  * R-N (region-noun phrase): [one retrieved sentence] + regions; the phrases or the matched
                             regions masked (one modality per example, p = 0.15 x match cosine);
                             phrase MLM and p-MRTC;
  * I-S (image-sentence):    [a sentence] + regions, the sentence with p = 1/2 one retrieved for
                             another image; ITM and sentence MLM (on the aligned pairs).

Each returns, per loss, the per-example mean over its masked items ("<loss>", [b]), the item count
("<loss>_items", [b]) and, for the predictions, the hit rate ("<loss>_acc", [b]). `pretraining_loss`
combines them as means over the batch's masked items (`losses.item_mean`): their sum, or, once the
curriculum starts, L_RT + w (L_RN + L_IS) with w = P(aligned) of each example's own (image,
retrieved sentence) from an *unmasked* ITM pass without gradient (`alignment_weight`); the weight
applies to the losses that learn from the retrieved sentence's words (R-N's, and I-S's MLM on the
aligned pairs), not to ITM, whose head must see aligned and unaligned pairs alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxmuvla import losses as L
from jaxmuvla import masking as M


@dataclasses.dataclass(frozen=True)
class Tokens:
    """Special token ids of the text tokenizer (BERT's by default), and the function words
    (determiners) that p-MRTC's hit rate does not count: "a" is in most phrases, so predicting it
    for every masked region would look like grounding."""

    cls: int = 101
    sep: int = 102
    mask: int = 103
    pad: int = 0
    vocab_size: int = 30522
    function_words: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class ObjectiveSettings:
    """Which objectives run, and their masking rates and sizes.

    region_tag, region_phrase, image_sentence: the three objectives (ablations switch one off);
    curriculum_steps: steps of the plain sum before the ITM weighting starts (m epochs of the
    paper, converted by the trainer), -1 = never; k: how many of the retrieved sentences an example
    draws from (the first k); mlm_rate, region_rate, phrase_rate: 0.15 as in the paper;
    feature_loss: "l2" (the paper's squared error) or "smooth_l1" (the public code); mrc, mrfr, p_mrtc: µ-VLA's
    region losses (masked regions predict their class, their feature, their phrase's words), each
    switchable (masked regions stay masked without them); max_masked: masked text
    positions gathered per example and objective for the vocabulary-sized head (R-N's phrases: twice
    as many), max_masked_regions: masked regions gathered for p-MRTC. The head costs about
    positions x hidden x vocabulary: it is most of a small model's step.
    """

    region_tag: bool = True
    region_phrase: bool = True
    image_sentence: bool = True
    curriculum_steps: int = 0
    k: int = 5
    mlm_rate: float = 0.15
    region_rate: float = 0.15
    phrase_rate: float = 0.15
    feature_loss: str = "l2"
    max_masked: int = 6
    max_masked_regions: int = 4
    dropout: bool = False  # training passes run the encoder's dropout (the weight's unmasked pass never does)
    mrc: bool = True
    mrfr: bool = True
    p_mrtc: bool = True


class Model:
    """What the objectives need of the transformer (see `jaxmuvla.model.MuVLA`): `encode(inputs) ->
    (hidden [b, Lt + R, H], pooled [b, H])` and heads on chosen hidden states."""

    encode: Callable[..., tuple[jax.Array, jax.Array]]
    mlm_logits: Callable[[jax.Array], jax.Array]
    itm_logits: Callable[[jax.Array], jax.Array]
    region_class_logits: Callable[[jax.Array], jax.Array]
    region_features: Callable[[jax.Array], jax.Array]


def _gather(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x [b, N, ...] at positions [b, M] -> [b, M, ...]."""
    return jnp.take_along_axis(x, positions.reshape(*positions.shape, *([1] * (x.ndim - 2))), axis=1)


def select_sentences(batch: dict, choice: jax.Array) -> dict:
    """One of the K sentences per example: choice [b] -> sentence_ids [b, L], phrase_spans [b, P, 2],
    region_phrase [b, R], region_phrase_cos [b, R]."""
    rows = jnp.arange(choice.shape[0])
    return {key: batch[key][rows, choice]
            for key in ("sentence_ids", "phrase_spans", "region_phrase", "region_phrase_cos")}


def tag_inputs(batch: dict, tokens: Tokens) -> dict:
    """R-T's text: [CLS] tag word pieces [SEP] (pads in between masked out); each tag word piece
    carries its region's box."""
    tag_ids = batch["tag_ids"]
    b = tag_ids.shape[0]
    ids = jnp.concatenate([jnp.full((b, 1), tokens.cls), tag_ids, jnp.full((b, 1), tokens.sep)], axis=1)
    real = jnp.concatenate([jnp.ones((b, 1), bool), tag_ids != tokens.pad, jnp.ones((b, 1), bool)], axis=1)
    owner = jnp.concatenate([jnp.full((b, 1), -1), batch["tag_region"], jnp.full((b, 1), -1)], axis=1)
    boxes = jnp.take_along_axis(batch["region_boxes"], jnp.maximum(owner, 0)[..., None], axis=1)
    return {"input_ids": ids, "attention_mask": real, "token_boxes": boxes * (owner >= 0)[..., None],
            "token_box_mask": owner >= 0, "maskable": real & (owner >= 0)}


def _item_counts(**masks: jax.Array) -> dict[str, jax.Array]:
    """"<loss>_items" [b] float32: how many items the example has to predict for that loss (its
    per-example loss is their mean, 0 when there are none), so batches and reports average over
    items, not examples."""
    return {f"{name}_items": jnp.sum(mask, axis=tuple(range(1, mask.ndim))).astype(jnp.float32)
            for name, mask in masks.items()}


_NOT_LOSSES = ("_items", "_acc")


def loss_names(parts: dict) -> list[str]:
    """The per-example losses of an objective's output (without the item counts and hit rates)."""
    return [k for k in parts if not k.endswith(_NOT_LOSSES)]


def _encode(model: Model, text: dict, features: jax.Array, batch: dict, dropout: bool = False):
    # deterministic is passed only in training mode, so stand-in models without dropout need not take it
    train = {"deterministic": False} if dropout else {}
    return model.encode(text["input_ids"], text["attention_mask"], text.get("token_boxes"),
                        text.get("token_box_mask"), features, batch["region_boxes"], batch["region_class"] >= 0, **train)


def _mlm(model: Model, hidden: jax.Array, masked: jax.Array, targets: jax.Array,
         count: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(per-example loss, hit rate, item count) [b] each, over the first `count` masked positions."""
    positions, valid = L.masked_tokens(masked, count)
    logits = model.mlm_logits(_gather(hidden, positions))
    expected = _gather(targets, positions)
    return (L.token_cross_entropy(logits, expected, valid), L.token_accuracy(logits, expected, valid),
            valid.sum(1).astype(jnp.float32))


def _mlm_parts(name: str, mlm: tuple[jax.Array, jax.Array, jax.Array]) -> dict[str, jax.Array]:
    loss, acc, items = mlm
    return {name: loss, f"{name}_acc": acc, f"{name}_items": items}


def region_tag_loss(model: Model, batch: dict, key: jax.Array, s: ObjectiveSettings, tokens: Tokens) -> dict:
    """R-T, per example: tag MLM + MRC + MRFR (toward the features before masking)."""
    k_sel, k_act, k_rand, k_reg = jax.random.split(key, 4)
    text = tag_inputs(batch, tokens)
    shape = text["input_ids"].shape
    mask = M.bert_mask(text["input_ids"], text["maskable"], jax.random.uniform(k_sel, shape),
                       jax.random.uniform(k_act, shape), jax.random.randint(k_rand, shape, 0, tokens.vocab_size),
                       tokens.mask, s.mlm_rate)
    valid = batch["region_class"] >= 0
    masked_regions = M.region_mask(valid, jax.random.uniform(k_reg, valid.shape), s.region_rate)
    original = batch["region_features"]
    hidden, _ = _encode(model, {**text, "input_ids": mask.input_ids},
                        jnp.where(masked_regions[..., None], 0.0, original), batch, s.dropout)
    regions = hidden[:, shape[1]:]
    parts = _mlm_parts("tag_mlm", _mlm(model, hidden[:, :shape[1]], mask.masked, text["input_ids"], s.max_masked))
    if s.mrc:
        logits = model.region_class_logits(regions)
        parts["mrc"] = L.region_class_loss(logits, batch["region_class"], masked_regions)
        parts["mrc_acc"] = L.token_accuracy(logits, batch["region_class"], masked_regions & valid)
        parts.update(_item_counts(mrc=masked_regions & valid))
    if s.mrfr:
        parts["mrfr"] = L.region_feature_loss(model.region_features(regions), original, masked_regions,
                                              s.feature_loss)
        parts.update(_item_counts(mrfr=masked_regions))
    return parts


def region_phrase_loss(model: Model, batch: dict, sentences: dict, key: jax.Array, s: ObjectiveSettings,
                       tokens: Tokens) -> dict:
    """R-N, per example: phrase MLM + p-MRTC."""
    k_mod, k_phrase, k_region = jax.random.split(key, 3)
    ids, spans = sentences["sentence_ids"], sentences["phrase_spans"]
    b, length = ids.shape
    mask = M.phrase_mask(ids, spans, sentences["region_phrase"], sentences["region_phrase_cos"],
                         jax.random.uniform(k_mod, (b,)), jax.random.uniform(k_phrase, spans.shape[:2]),
                         jax.random.uniform(k_region, sentences["region_phrase"].shape), tokens.mask, s.phrase_rate)
    features = jnp.where(mask.region_masked[..., None], 0.0, batch["region_features"])
    hidden, _ = _encode(model, {"input_ids": mask.input_ids, "attention_mask": ids != tokens.pad}, features, batch,
                        s.dropout)
    parts = _mlm_parts("phrase_mlm", _mlm(model, hidden[:, :length], mask.token_masked, ids, 2 * s.max_masked))
    if s.p_mrtc:
        positions, valid = L.masked_tokens(mask.region_masked, s.max_masked_regions)
        target = jnp.take_along_axis(mask.region_target_phrase, positions, axis=1)  # [b, M]
        words = M.phrase_token_positions(spans, length)  # [b, P, L]
        target_words = (jnp.take_along_axis(words, jnp.maximum(target, 0)[..., None], axis=1)
                        & (target >= 0)[..., None])
        logits = model.mlm_logits(_gather(hidden[:, length:], positions))
        parts["p_mrtc"] = L.phrase_word_loss(logits, ids, target_words, valid)
        # the loss keeps every word piece (the paper's); the hit rate counts content words only
        parts["p_mrtc_acc"] = L.phrase_word_accuracy(logits, ids, target_words, valid, tokens.function_words)
        parts.update(_item_counts(p_mrtc=valid & target_words.any(-1)))
    return parts


def image_sentence_loss(model: Model, batch: dict, sentences: dict, key: jax.Array, s: ObjectiveSettings,
                        tokens: Tokens) -> tuple[dict, jax.Array]:
    """I-S, per example: ITM (with p = 1/2 the sentence retrieved for the next image of the batch)
    + sentence MLM on the aligned pairs (every sentence masked, so the masks say nothing of the pair);
    also which pairs were aligned [b] bool."""
    k_neg, k_sel, k_act, k_rand = jax.random.split(key, 4)
    ids = sentences["sentence_ids"]
    aligned = jax.random.uniform(k_neg, (ids.shape[0],)) >= 0.5
    ids = jnp.where(aligned[:, None], ids, jnp.roll(ids, -1, axis=0))  # another image's sentence
    # Every sentence is masked alike, whatever its pair: masking only the aligned ones would let
    # the ITM head read the label off the [MASK] tokens. The MLM loss counts the aligned ones.
    maskable = (ids != tokens.pad) & (ids != tokens.cls) & (ids != tokens.sep)
    mask = M.bert_mask(ids, maskable, jax.random.uniform(k_sel, ids.shape), jax.random.uniform(k_act, ids.shape),
                       jax.random.randint(k_rand, ids.shape, 0, tokens.vocab_size), tokens.mask, s.mlm_rate)
    hidden, pooled = _encode(model, {"input_ids": mask.input_ids, "attention_mask": ids != tokens.pad},
                             batch["region_features"], batch, s.dropout)
    predicted = mask.masked & aligned[:, None]
    itm_logits = model.itm_logits(pooled)
    parts = {"itm": L.itm_loss(itm_logits, aligned),
             "itm_acc": (jnp.argmax(itm_logits, -1) == jnp.where(aligned, 0, 1)).astype(jnp.float32),
             **_item_counts(itm=jnp.ones_like(aligned)),
             **_mlm_parts("sentence_mlm", _mlm(model, hidden[:, :ids.shape[1]], predicted, ids, s.max_masked))}
    return parts, aligned


def alignment_weight(model: Model, batch: dict, sentences: dict, tokens: Tokens) -> jax.Array:
    """The curriculum's weight [b]: P(aligned) of each image with its own retrieved sentence, both
    unmasked (masked inputs would make the weight a guess about the masks), without gradient."""
    ids = sentences["sentence_ids"]
    _, pooled = _encode(model, {"input_ids": ids, "attention_mask": ids != tokens.pad}, batch["region_features"], batch)
    return jax.lax.stop_gradient(L.aligned_probability(model.itm_logits(pooled)))


RT_LOSSES, RN_LOSSES, IS_LOSSES = ("tag_mlm", "mrc", "mrfr"), ("phrase_mlm", "p_mrtc"), ("itm", "sentence_mlm")


def batch_metrics(parts: dict) -> dict[str, jax.Array]:
    """Each loss and hit rate of the batch as a mean over its masked items."""
    return {k: L.item_mean(v, parts[f"{_loss_of(k)}_items"]) for k, v in parts.items() if not k.endswith("_items")}


def _loss_of(key: str) -> str:
    return key[:-len("_acc")] if key.endswith("_acc") else key


def pretraining_loss(model: Model, batch: dict, key: jax.Array, step: jax.Array, s: ObjectiveSettings,
                     tokens: Tokens) -> tuple[jax.Array, dict[str, Any]]:
    """(scalar loss, metrics) of one batch of the corpus under the settings' objectives: the sum over
    losses of each one's mean over the batch's masked items, the R-N and I-S ones weighted per
    example once the curriculum starts."""
    k_choice, k_rt, k_rn, k_is = jax.random.split(key, 4)
    b = batch["region_class"].shape[0]
    sentences = select_sentences(batch, jax.random.randint(k_choice, (b,), 0, s.k))
    parts: dict[str, jax.Array] = {}
    aligned = jnp.ones((b,), bool)
    if s.region_tag:
        parts.update(region_tag_loss(model, batch, k_rt, s, tokens))
    if s.region_phrase:
        parts.update(region_phrase_loss(model, batch, sentences, k_rn, s, tokens))
    if s.image_sentence:
        is_parts, aligned = image_sentence_loss(model, batch, sentences, k_is, s, tokens)
        parts.update(is_parts)
    weighted = jnp.logical_and(s.image_sentence and s.curriculum_steps >= 0, step >= s.curriculum_steps)
    ones = jnp.ones((b,), jnp.float32)
    # The unmasked pass costs a forward of the batch: run only once the curriculum is on.
    w = jax.lax.cond(weighted, lambda: alignment_weight(model, batch, sentences, tokens), lambda: ones)
    # w says how far to trust what the retrieved sentence says of the image: it weights the losses
    # that learn from its words (R-N's, I-S's MLM on the aligned pairs). Not the ITM loss: weighting
    # its positives alone tilts the head toward "unaligned", which lowers w further (measured: w fell
    # to 0.03 within 100 steps of the curriculum's start), and weighting a negative by its image's
    # own retrieval (the public code) says nothing about that pair.
    weights = {**{k: w for k in RN_LOSSES}, "sentence_mlm": w}
    loss = sum(L.item_mean(parts[k], parts[f"{k}_items"], weights.get(k)) for k in loss_names(parts))
    metrics = batch_metrics(parts)
    metrics["itm_weight"] = w.mean()
    return loss, metrics


def round_robin_loss(model: Model, batch: dict, key: jax.Array, step: jax.Array, s: ObjectiveSettings,
                     tokens: Tokens) -> tuple[jax.Array, dict[str, Any]]:
    """U-VisualBERT's round robin (no retrieval): even steps MLM on text alone (batch["corpus_ids"]
    [b, L], sentences of the corpus with no image), odd steps R-T on the images (tags + regions)."""

    def text_only(_):
        ids = batch["corpus_ids"]
        k_sel, k_act, k_rand = jax.random.split(key, 3)
        maskable = (ids != tokens.pad) & (ids != tokens.cls) & (ids != tokens.sep)
        mask = M.bert_mask(ids, maskable, jax.random.uniform(k_sel, ids.shape), jax.random.uniform(k_act, ids.shape),
                           jax.random.randint(k_rand, ids.shape, 0, tokens.vocab_size), tokens.mask, s.mlm_rate)
        no_regions = {**batch, "region_class": jnp.full_like(batch["region_class"], -1)}
        hidden, _ = _encode(model, {"input_ids": mask.input_ids, "attention_mask": ids != tokens.pad},
                            jnp.zeros_like(batch["region_features"]), no_regions, s.dropout)
        text = _mlm_parts("text_mlm", _mlm(model, hidden[:, :ids.shape[1]], mask.masked, ids, s.max_masked))
        metrics = batch_metrics(text)
        return metrics["text_mlm"], {**metrics, **{k: 0.0 * metrics["text_mlm"] for k in image_metrics}}

    def image_only(_):
        metrics = batch_metrics(region_tag_loss(model, batch, key, s, tokens))
        loss = sum(metrics[k] for k in metrics if not k.endswith("_acc"))
        return loss, {**{k: 0.0 * loss for k in text_metrics}, **metrics}

    # The two branches must return the same metric names.
    image_metrics = ("tag_mlm", "tag_mlm_acc", *(("mrc", "mrc_acc") if s.mrc else ()), *(("mrfr",) if s.mrfr else ()))
    text_metrics = ("text_mlm", "text_mlm_acc")

    return jax.lax.cond(step % 2 == 0, text_only, image_only, None)
