"""µ-VLA's pre-training losses, per example, as pure functions (b examples).

Every loss here returns one value per example ([b]): the mean over that example's masked items (0
when it has none). A batch's loss is then the mean over its masked *items* (`item_mean`: each
example's mean times its item count, over the batch's item count), as MLM losses are everywhere:
a batch mean over examples would count the examples with nothing masked as zeros and dilute the
loss (R-N masks with p = 0.15 x cosine on one modality, so most of its examples have nothing).
`item_mean` also takes the ITM curriculum's per-example weights; the public PyTorch code
weighted a batch mean instead, which is the product of two means, not the mean of the products.

  * `masked_tokens`: the positions a mask selects, gathered to a fixed count (only those go
    through the vocabulary-sized MLM head);
  * `token_cross_entropy`: MLM (tags in R-T, phrases in R-N, the sentence in I-S);
  * `region_class_loss` (MRC) and `region_feature_loss` (MRFR, to the *original* feature: the
    public code regressed to the feature it had already zeroed);
  * `phrase_word_loss` (p-MRTC): a masked region predicts the word pieces of its matched phrase;
  * `itm_loss`, `aligned_probability` (index 0 of the 2-way head = aligned, as HF's VisualBERT);
  * `item_mean`: a batch's loss over its masked items, optionally weighted per example;
  * `token_accuracy`, `phrase_word_accuracy`: the matching hit rates, for the gates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def masked_tokens(mask: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """mask [b, L] bool -> (positions [b, count] int32, valid [b, count] bool): the first `count`
    masked positions of each row (in order), padded with position 0 marked invalid."""
    order = jnp.argsort(~mask, axis=1, stable=True)[:, :count]  # masked positions first, in order
    valid = jnp.take_along_axis(mask, order, axis=1)
    return order.astype(jnp.int32), valid


def _per_example_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
    """values, valid [b, ...] -> [b]: the mean over each example's valid entries (0 if none)."""
    axes = tuple(range(1, values.ndim))
    weight = valid.astype(values.dtype)
    return (values * weight).sum(axes) / jnp.maximum(weight.sum(axes), 1.0)


def token_cross_entropy(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
    """MLM: logits [b, M, V] at gathered positions, targets [b, M] (the original ids), valid [b, M] -> [b]."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return _per_example_mean(ce, valid)


def region_class_loss(logits: jax.Array, classes: jax.Array, masked: jax.Array) -> jax.Array:
    """MRC: logits [b, R, C] over detector classes, classes [b, R] (-1 = none), masked [b, R] -> [b]."""
    valid = masked & (classes >= 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.maximum(classes, 0))
    return _per_example_mean(ce, valid)


def region_feature_loss(predicted: jax.Array, original: jax.Array, masked: jax.Array,
                        kind: str = "smooth_l1") -> jax.Array:
    """MRFR: predicted [b, R, D] against the ORIGINAL (unmasked) features [b, R, D] of the masked
    regions [b, R] -> [b]; "smooth_l1" (the public code, beta 1) or "l2" (the paper's squared error),
    averaged over the feature dimensions."""
    diff = predicted.astype(jnp.float32) - original.astype(jnp.float32)
    if kind == "smooth_l1":
        per_dim = jnp.where(jnp.abs(diff) < 1.0, 0.5 * diff ** 2, jnp.abs(diff) - 0.5)
    elif kind == "l2":
        per_dim = diff ** 2
    else:
        raise ValueError(f"region feature loss {kind!r}: expected 'smooth_l1' or 'l2'")
    return _per_example_mean(per_dim.mean(-1), masked)


def phrase_word_loss(logits: jax.Array, sentence_ids: jax.Array, phrase_positions: jax.Array,
                     valid: jax.Array) -> jax.Array:
    """p-MRTC: logits [b, M, V] of M gathered masked regions over the vocabulary (the tied MLM head),
    sentence_ids [b, L], phrase_positions [b, M, L] bool (the word pieces of each region's matched
    phrase), valid [b, M] -> [b]: the mean over the masked regions of the mean over their phrase's
    word pieces of -log p(word piece)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    at_words = jnp.take_along_axis(logp, jnp.broadcast_to(sentence_ids[:, None, :], phrase_positions.shape), axis=-1)
    per_region = _per_example_mean(-at_words.reshape(-1, at_words.shape[-1]),
                                   phrase_positions.reshape(-1, phrase_positions.shape[-1]))
    return _per_example_mean(per_region.reshape(valid.shape), valid & phrase_positions.any(-1))


def aligned_probability(itm_logits: jax.Array) -> jax.Array:
    """[b, 2] -> [b]: P(aligned) of the 2-way image-text head (index 0 = aligned, as HF's VisualBERT)."""
    return jax.nn.softmax(itm_logits.astype(jnp.float32), axis=-1)[:, 0]


def itm_loss(itm_logits: jax.Array, aligned: jax.Array) -> jax.Array:
    """ITM: [b, 2] logits, aligned [b] bool -> [b] cross-entropy."""
    return optax.softmax_cross_entropy_with_integer_labels(itm_logits.astype(jnp.float32),
                                                           jnp.where(aligned, 0, 1))


def item_mean(values: jax.Array, counts: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """A batch's loss over its masked items: values [b] (each example's mean over its items), counts
    [b] (its number of items), weights [b] (the curriculum's, without gradient; None = 1) ->
    sum(w * count * value) / sum(count). Weights below 1 lower the loss (the denominator is the
    unweighted item count): a doubtful example counts less, it does not re-normalise the rest."""
    counts = counts.astype(jnp.float32)
    total = values.astype(jnp.float32) * counts
    if weights is not None:
        total = jax.lax.stop_gradient(weights.astype(jnp.float32)) * total
    return total.sum() / jnp.maximum(counts.sum(), 1.0)


def token_accuracy(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
    """logits [b, M, C], targets [b, M], valid [b, M] -> [b]: each example's share of valid items whose
    argmax is the target (0 if none)."""
    hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return _per_example_mean(hit, valid)


def phrase_word_accuracy(logits: jax.Array, sentence_ids: jax.Array, phrase_positions: jax.Array,
                         valid: jax.Array, ignore: tuple[int, ...] = ()) -> jax.Array:
    """p-MRTC's hit rate: [b] share of the valid masked regions whose argmax word piece is one of
    their phrase's word pieces other than the `ignore`d ids (function words such as "a", which
    most phrases share: predicting it for every region is no grounding); a region whose phrase has
    only ignored pieces counts as a miss. Shapes as `phrase_word_loss`."""
    content = phrase_positions
    if ignore:
        content = phrase_positions & ~jnp.isin(sentence_ids, jnp.asarray(ignore))[:, None, :]
    top = jnp.argmax(logits, axis=-1)  # [b, M]
    hit = jnp.any((sentence_ids[:, None, :] == top[..., None]) & content, axis=-1)
    return _per_example_mean(hit.astype(jnp.float32), valid & phrase_positions.any(-1))
