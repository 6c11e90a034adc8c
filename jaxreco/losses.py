"""RECO's training loss: InfoNCE between refined and original embeddings, and the learned temperature."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from vlcore.two_tower.model import contrastive_loss


class LogitScale(nn.Module):
    """The learned temperature as CLIP keeps it: a log scale, used as min(exp(log_scale), max_scale).

    `LogitScale().apply({"params": p})` -> scalar; gradients stop while the clamp is active.
    """

    log_init: float = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
    max_scale: float = 100.0  # CLIP's clamp, so the logits cannot blow up

    @nn.compact
    def __call__(self) -> jax.Array:
        log_scale = self.param("log_scale", nn.initializers.constant(self.log_init), (), jnp.float32)
        return jnp.minimum(jnp.exp(log_scale), self.max_scale)


def _check_pair(a: jax.Array, b: jax.Array, what: str):
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] < 1:
        raise ValueError(f"{what}: need two non-empty [batch, dim] arrays of one shape, got {a.shape} and {b.shape}")


def info_nce(a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """Symmetric InfoNCE of aligned pairs a [batch, dim], b [batch, dim]: the mean of the a->b and b->a
    cross-entropies of the logits scale * a @ b.T against the diagonal."""
    _check_pair(a, b, "info_nce")
    return contrastive_loss(a, b, scale)[0]


def reco_loss(
    refined_image: jax.Array, refined_text: jax.Array, image: jax.Array, text: jax.Array, scale: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """RECO's loss over a batch of aligned pairs, all [batch, dim] and unit norm:

        InfoNCE(refined image, refined text) + InfoNCE(refined image, text) + InfoNCE(image, refined text)

    The two mixed terms keep the refined embeddings aligned with the frozen space they refine.
    Returns (loss, metrics): the three terms and the in-batch image->text top-1 accuracy of the refined pairs.
    """
    for x, name in ((refined_text, "refined_text"), (image, "image"), (text, "text")):
        _check_pair(refined_image, x, f"reco_loss (refined_image vs {name})")
    refined_refined, accuracy = contrastive_loss(refined_image, refined_text, scale)
    refined_image_text = info_nce(refined_image, text, scale)
    image_refined_text = info_nce(image, refined_text, scale)
    loss = refined_refined + refined_image_text + image_refined_text
    return loss, {
        "loss_refined_refined": refined_refined,
        "loss_refined_image_text": refined_image_text,
        "loss_image_refined_text": image_refined_text,
        "batch_i2t_acc": accuracy,
    }
