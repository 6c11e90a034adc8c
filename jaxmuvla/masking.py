"""µ-VLA's masking, as pure functions of the inputs and of uniform random numbers.

Every function takes its randomness as arrays of uniforms in [0, 1) (drawn by the caller from the
step's key), so it runs inside the jitted step on any number of devices and a numpy reference can
replay exactly the same draws in the tests. Shapes: b examples, L text positions, R regions,
P phrases.

  * `bert_mask`: BERT's token masking (select `rate` of the maskable positions; of those 80 %
    become [MASK], 10 % a random token, 10 % stay) for tag MLM (R-T) and sentence MLM (I-S);
  * `region_mask`: the regions whose feature is zeroed (masked region modelling);
  * `phrase_mask`: R-N's masking, one modality per example: either the word pieces of noun
    phrases or the regions matched to a phrase, each with probability rate x match cosine.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenMask(NamedTuple):
    """masked [b, L] bool: the positions to predict; input_ids [b, L]: the corrupted input."""

    masked: jax.Array
    input_ids: jax.Array


def bert_mask(input_ids: jax.Array, maskable: jax.Array, u_select: jax.Array, u_action: jax.Array,
              random_ids: jax.Array, mask_id: int, rate: float = 0.15) -> TokenMask:
    """BERT's masking of [b, L] token ids; `maskable` [b, L] excludes [CLS], [SEP] and padding.

    A position is selected when u_select < rate; a selected one becomes [MASK] when u_action < 0.8,
    random_ids (uniform over the vocabulary) when 0.8 <= u_action < 0.9, and stays otherwise.
    """
    masked = maskable & (u_select < rate)
    replaced = jnp.where(u_action < 0.8, mask_id, jnp.where(u_action < 0.9, random_ids, input_ids))
    return TokenMask(masked, jnp.where(masked, replaced, input_ids))


def region_mask(valid: jax.Array, u: jax.Array, rate: float = 0.15) -> jax.Array:
    """[b, R] bool: the real regions (valid) whose feature is zeroed, each with probability `rate`."""
    return valid & (u < rate)


class PhraseMask(NamedTuple):
    """R-N's masking of one batch.

    text: [b] bool, which examples mask phrases (the others mask regions);
    token_masked [b, L]: masked word pieces (inside masked phrases); input_ids [b, L]: with [MASK];
    region_masked [b, R]: masked regions (matched to a phrase); region_target_phrase [b, R]: the
    phrase each masked region must describe (p-MRTC), -1 elsewhere.
    """

    text: jax.Array
    token_masked: jax.Array
    input_ids: jax.Array
    region_masked: jax.Array
    region_target_phrase: jax.Array


def phrase_token_positions(spans: jax.Array, length: int) -> jax.Array:
    """[b, P, 2] half-open word-piece ranges -> [b, P, L] bool: the positions inside each phrase."""
    position = jnp.arange(length)
    return (position >= spans[..., :1]) & (position < spans[..., 1:]) & (spans[..., :1] >= 0)


def phrase_mask(input_ids: jax.Array, spans: jax.Array, region_phrase: jax.Array, region_cos: jax.Array,
                u_modality: jax.Array, u_phrase: jax.Array, u_region: jax.Array, mask_id: int,
                rate: float = 0.15) -> PhraseMask:
    """R-N's masking: per example, with probability 1/2 the phrases (text), else the regions.

    input_ids [b, L]; spans [b, P, 2] (-1 = none); region_phrase [b, R] (the phrase each region
    matches, -1 = none); region_cos [b, R] (its cosine); u_modality [b], u_phrase [b, P], u_region
    [b, R]: uniforms. Text: phrase p is masked (all its word pieces become [MASK]) with probability
    rate x (the best cosine of a region matched to p); a phrase no region matches is never
    masked. Regions: region r is masked with probability rate x its match cosine. Only one modality
    of a phrase-region pair is ever masked (one modality per example).
    """
    text = u_modality < 0.5
    num_phrases = spans.shape[1]
    matched = (region_phrase[..., None] == jnp.arange(num_phrases)) & (region_phrase[..., None] >= 0)  # [b, R, P]
    phrase_cos = jnp.max(jnp.where(matched, region_cos[..., None], 0.0), axis=1)  # [b, P]
    phrase_chosen = text[:, None] & (spans[..., 0] >= 0) & (u_phrase < rate * jnp.clip(phrase_cos, 0.0, 1.0))
    token_masked = jnp.any(phrase_token_positions(spans, input_ids.shape[1]) & phrase_chosen[..., None], axis=1)
    region_masked = (~text[:, None]) & (region_phrase >= 0) & (u_region < rate * jnp.clip(region_cos, 0.0, 1.0))
    return PhraseMask(text, token_masked, jnp.where(token_masked, mask_id, input_ids), region_masked,
                      jnp.where(region_masked, region_phrase, -1))
