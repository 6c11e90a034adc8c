"""RECO's training loss: InfoNCE between refined and original embeddings (temperature: vlcore.contrastive)."""

from __future__ import annotations

import jax

from vlcore.contrastive import check_pair, contrastive_loss


def reco_loss(
    refined_image: jax.Array, refined_text: jax.Array, image: jax.Array, text: jax.Array, scale: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """RECO's loss over a batch of aligned pairs, all [batch, dim] and unit norm:

        InfoNCE(refined image, refined text) + InfoNCE(refined image, text) + InfoNCE(image, refined text)

    The two mixed terms keep the refined embeddings aligned with the frozen space they refine.
    Returns (loss, metrics): the three terms and the in-batch image->text top-1 accuracy of the refined pairs.
    """
    for x, name in ((refined_text, "refined_text"), (image, "image"), (text, "text")):
        check_pair(refined_image, x, f"reco_loss (refined_image vs {name})")
    refined_refined, accuracy = contrastive_loss(refined_image, refined_text, scale)
    refined_image_text, _ = contrastive_loss(refined_image, text, scale)
    image_refined_text, _ = contrastive_loss(image, refined_text, scale)
    loss = refined_refined + refined_image_text + image_refined_text
    return loss, {
        "loss_refined_refined": refined_refined,
        "loss_refined_image_text": refined_image_text,
        "loss_image_refined_text": image_refined_text,
        "batch_i2t_acc": accuracy,
    }
