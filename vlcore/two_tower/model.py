"""The world's frozen two-tower model, LiT-style: a locked MiniLM text tower, a small ViT trained.

The text tower is the real all-MiniLM-L6-v2 (sentence embeddings, 384-d, unit norm) and stays
locked, so caption embeddings are computed once; only the image tower (a CLIP-style ViT from
`vlcore.encoders`) and the temperature train, with the symmetric contrastive loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from vlcore.contrastive import CLIP_LOG_SCALE_INIT, LogitScale, contrastive_loss
from vlcore.encoders.clip import CLIPVisionTransformer
from vlcore.encoders.configs import CLIPVisionConfig
from vlcore.encoders.layers import dense, l2_normalize


class ImageTower(nn.Module):
    """uint8 images [batch, H, W, 3] -> unit-norm embeddings [batch, embed_dim]."""

    vision: CLIPVisionConfig
    embed_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, region_boxes: jax.Array | None = None) -> jax.Array:
        """region_boxes [batch, regions, 4] (ymin, xmin, ymax, xmax in [0, 1]): embed each box's patch
        tokens instead, [batch, regions, embed_dim], in the same space as the image embeddings."""
        x = images.astype(jnp.float32) / 127.5 - 1.0  # uint8 -> [-1, 1]
        out = CLIPVisionTransformer(self.vision, self.dtype, name="vision_model")(x, region_boxes)
        pooled = out["pooler_output"] if region_boxes is None else out["region_output"]
        return l2_normalize(dense(self.embed_dim, "visual_projection", self.dtype, use_bias=False)(pooled)
                            .astype(jnp.float32))


class TwoTower(nn.Module):
    """The trainable part: the image tower and the learned temperature (CLIP's, clamped at 100)."""

    vision: CLIPVisionConfig
    embed_dim: int
    log_scale_init: float = CLIP_LOG_SCALE_INIT
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.image_tower = ImageTower(self.vision, self.embed_dim, self.dtype)
        self.temperature = LogitScale(self.log_scale_init)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.image_tower(images), self.temperature()

    def embed_images(self, images: jax.Array) -> jax.Array:
        return self.image_tower(images)

    def embed_regions(self, images: jax.Array, region_boxes: jax.Array) -> jax.Array:
        return self.image_tower(images, region_boxes)


def two_tower_loss(module: TwoTower, params, batch) -> tuple[jax.Array, dict]:
    """Loss of a batch {"image": uint8 [b, H, W, 3], "text_embedding": [b, dim] (locked, unit norm)}."""
    image_embeds, scale = module.apply({"params": params}, batch["image"])
    loss, accuracy = contrastive_loss(image_embeds, batch["text_embedding"], scale)
    return loss, {"batch_i2t_acc": accuracy, "logit_scale": scale}
