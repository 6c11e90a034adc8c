"""Flax CLIP: ViT image tower, causal text tower, projections and logit scale.

Parameter names mirror the transformers `CLIPModel` state dict (`vision_model.encoder.layers_0
.self_attn.q_proj.kernel` <-> `vision_model.encoder.layers.0.self_attn.q_proj.weight`), so
checkpoint import and export are a mechanical renaming (see `vlcore.hf_checkpoint`).

Images are NHWC float arrays `[batch, height, width, channels]`, already normalised as the
checkpoint expects (CLIP's mean/std); token ids come from the checkpoint's tokenizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from vlcore.encoders.configs import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, check_heads
from vlcore.encoders.layers import ACTIVATIONS, dense, l2_normalize, layer_norm, multi_head_attention


class CLIPAttention(nn.Module):
    hidden_size: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        q = dense(self.hidden_size, "q_proj", self.dtype)(x)
        k = dense(self.hidden_size, "k_proj", self.dtype)(x)
        v = dense(self.hidden_size, "v_proj", self.dtype)(x)
        out = multi_head_attention(q, k, v, self.num_heads, mask)
        return dense(self.hidden_size, "out_proj", self.dtype)(out)


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ACTIVATIONS[self.hidden_act](dense(self.intermediate_size, "fc1", self.dtype)(x))
        return dense(self.hidden_size, "fc2", self.dtype)(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block, the same in both towers."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        cfg = self.config
        h = layer_norm(cfg.layer_norm_eps, "layer_norm1", self.dtype)(x)
        x = x + CLIPAttention(cfg.hidden_size, cfg.num_attention_heads, self.dtype, name="self_attn")(h, mask)
        h = layer_norm(cfg.layer_norm_eps, "layer_norm2", self.dtype)(x)
        mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, self.dtype, name="mlp")
        return x + mlp(h)


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x, mask)
        return x


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config
        p = cfg.patch_size
        patches = nn.Conv(
            cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
            dtype=self.dtype, param_dtype=jnp.float32, name="patch_embedding",
        )(images)
        patches = patches.reshape(patches.shape[0], -1, cfg.hidden_size)  # row-major, as HF flattens
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,), jnp.float32)
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (patches.shape[0], 1, cfg.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        positions = nn.Embed(cfg.num_patches + 1, cfg.hidden_size, dtype=self.dtype, name="position_embedding")
        return x + positions(jnp.arange(cfg.num_patches + 1))[None]


class CLIPVisionTransformer(nn.Module):
    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, region_boxes: jax.Array | None = None) -> dict[str, jax.Array]:
        """images [batch, image_size, image_size, channels] -> last_hidden_state, pooler_output.

        region_boxes [batch, regions, 4] (ymin, xmin, ymax, xmax in [0, 1]) adds region_output
        [batch, regions, width]: each box's patch tokens averaged, weighted by how much of each patch
        the box covers, through the same final LayerNorm as the pooled token (for region features
        from one pass over the image; see `patch_weights`).
        """
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images: expected shape [batch, {expected[0]}, {expected[1]}, {expected[2]}] (NHWC) "
                f"for this checkpoint, got {tuple(images.shape)}"
            )
        check_heads(cfg.hidden_size, cfg.num_attention_heads, "vision_config")
        x = CLIPVisionEmbeddings(cfg, self.dtype, name="embeddings")(images.astype(self.dtype))
        x = layer_norm(cfg.layer_norm_eps, "pre_layrnorm", self.dtype)(x)  # sic: HF's spelling
        x = CLIPEncoder(cfg, self.dtype, name="encoder")(x)
        post_layernorm = layer_norm(cfg.layer_norm_eps, "post_layernorm", self.dtype)
        out = {"last_hidden_state": x, "pooler_output": post_layernorm(x[:, 0])}
        if region_boxes is not None:
            weights = patch_weights(region_boxes, cfg.image_size // cfg.patch_size).astype(x.dtype)
            regions = jnp.einsum("brp,bpw->brw", weights, x[:, 1:]) / jnp.maximum(weights.sum(-1, keepdims=True), 1e-6)
            out["region_output"] = post_layernorm(regions)
        return out


def patch_weights(boxes: jax.Array, grid: int) -> jax.Array:
    """boxes [..., 4] (ymin, xmin, ymax, xmax in [0, 1]) -> [..., grid * grid]: the share of each patch
    (row-major, as the patch tokens) that the box covers."""
    edges = jnp.arange(grid + 1) / grid
    lo, hi = edges[:-1], edges[1:]

    def cover(a, b):  # [..., grid]: overlap of [a, b] with each patch interval, as a share of the patch
        return jnp.clip(jnp.minimum(b[..., None], hi) - jnp.maximum(a[..., None], lo), 0.0, None) * grid

    rows, cols = cover(boxes[..., 0], boxes[..., 2]), cover(boxes[..., 1], boxes[..., 3])
    return (rows[..., :, None] * cols[..., None, :]).reshape(*boxes.shape[:-1], grid * grid)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the pooled token per sequence, as transformers picks it for old and new configs."""
    if eos_token_id == 2:  # configs from before transformers PR #24773: EOT has the largest id
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)  # first EOS (pad may equal EOS)


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, name="position_embedding")
        return tokens(input_ids) + positions(jnp.arange(input_ids.shape[1]))[None]


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
        """input_ids, attention_mask [batch, seq] -> last_hidden_state [batch, seq, width], pooler_output."""
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected shape [batch, seq], got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids: sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"{cfg.max_position_embeddings}"
            )
        check_heads(cfg.hidden_size, cfg.num_attention_heads, "text_config")
        x = CLIPTextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
        mask = nn.make_causal_mask(input_ids, dtype=jnp.bool_)  # [batch, 1, seq, seq]
        if attention_mask is not None:  # padded keys are never attended to
            mask = jnp.logical_and(mask, attention_mask.astype(jnp.bool_)[:, None, None, :])
        x = CLIPEncoder(cfg, self.dtype, name="encoder")(x, mask)
        x = layer_norm(cfg.layer_norm_eps, "final_layer_norm", self.dtype)(x)
        pooled = x[jnp.arange(x.shape[0]), eos_positions(input_ids, cfg.eos_token_id)]
        return {"last_hidden_state": x, "pooler_output": pooled}


class CLIPModel(nn.Module):
    """Two towers, their projections and the logit scale, as transformers' `CLIPModel`."""

    config: CLIPConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.text_model = CLIPTextTransformer(cfg.text, self.dtype)
        self.vision_model = CLIPVisionTransformer(cfg.vision, self.dtype)
        self.visual_projection = dense(cfg.projection_dim, "visual_projection", self.dtype, use_bias=False)
        self.text_projection = dense(cfg.projection_dim, "text_projection", self.dtype, use_bias=False)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(cfg.logit_scale_init_value), (), jnp.float32
        )

    def get_image_features(self, images: jax.Array) -> jax.Array:
        """images [batch, H, W, C] -> projected, unnormalised embeddings [batch, projection_dim]."""
        return self.visual_projection(self.vision_model(images)["pooler_output"])

    def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids [batch, seq] -> projected, unnormalised embeddings [batch, projection_dim]."""
        return self.text_projection(self.text_model(input_ids, attention_mask)["pooler_output"])

    def __call__(
        self, images: jax.Array, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        """Returns normalised image_embeds, text_embeds and the scaled cosine logits.

        logits_per_image [num_images, num_texts]; logits_per_text is its transpose.
        """
        image_embeds = l2_normalize(self.get_image_features(images).astype(jnp.float32))
        text_embeds = l2_normalize(self.get_text_features(input_ids, attention_mask).astype(jnp.float32))
        logits_per_text = text_embeds @ image_embeds.T * jnp.exp(self.logit_scale)
        return {
            "image_embeds": image_embeds,
            "text_embeds": text_embeds,
            "logits_per_image": logits_per_text.T,
            "logits_per_text": logits_per_text,
        }
