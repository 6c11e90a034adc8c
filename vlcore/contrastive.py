"""Contrastive learning pieces both two-tower trainers share: the learned temperature and InfoNCE."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn


CLIP_LOG_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature 0.07


class LogitScale(nn.Module):
    """The learned temperature as CLIP keeps it: a log scale, used as min(exp(log_scale), max_scale).

    `LogitScale().apply({"params": p})` -> scalar; gradients stop while the clamp is active.
    """

    log_init: float = CLIP_LOG_SCALE_INIT
    max_scale: float = 100.0  # CLIP's clamp, so the logits cannot blow up

    @nn.compact
    def __call__(self) -> jax.Array:
        log_scale = self.param("log_scale", nn.initializers.constant(self.log_init), (), jnp.float32)
        return jnp.minimum(jnp.exp(log_scale), self.max_scale)


def check_pair(a: jax.Array, b: jax.Array, what: str) -> None:
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] < 1:
        raise ValueError(f"{what}: need two non-empty [batch, dim] arrays of one shape, got {a.shape} and {b.shape}")


def contrastive_loss(a: jax.Array, b: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric InfoNCE of aligned pairs a [batch, dim], b [batch, dim] (unit norm).

    The mean of the a->b and b->a cross-entropies of the logits scale * a @ b.T against the
    diagonal. Returns (loss, a->b top-1 accuracy within the batch).
    """
    check_pair(a, b, "contrastive_loss")
    logits = scale * a @ b.T
    labels = jnp.arange(logits.shape[0])
    loss = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())
    return loss, (jnp.argmax(logits, axis=1) == labels).mean()
