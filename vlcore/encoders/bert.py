"""Flax BERT: embeddings with LayerNorm, post-LN encoder, optional pooler, tied MLM head.

Parameter names mirror the transformers `BertModel` / `BertForMaskedLM` state dicts
(`encoder.layer_0.attention.self.query.kernel` <-> `encoder.layer.0.attention.self.query.weight`).
The MLM decoder has no weight of its own: it multiplies by the word-embedding table, as the
tied transformers head does, plus `cls.predictions.bias`.

Dropout sits where transformers' PyTorch BERT has it (after the embedding LayerNorm, on the
attention probabilities, after the attention-output and output dense layers, each module named
`dropout` as there), at the config's `hidden_dropout_prob` / `attention_probs_dropout_prob`. It
is active only when `__call__` gets deterministic=False, and then draws from the "dropout" rng
collection (`apply(..., rngs={"dropout": key})`); the default deterministic=True is eval mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from vlcore.encoders.configs import BertConfig, check_heads
from vlcore.encoders.layers import ACTIVATIONS, dense, layer_norm, multi_head_attention


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.word_embeddings = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype)
        self.position_embeddings = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype)
        self.token_type_embeddings = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, dtype=self.dtype)
        self.LayerNorm = layer_norm(cfg.layer_norm_eps, "LayerNorm", self.dtype)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        positions = jnp.arange(input_ids.shape[1])[None]
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x + self.position_embeddings(positions)), deterministic=deterministic)


class BertSelfAttention(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool = True) -> jax.Array:
        width, rate = self.config.hidden_size, self.config.attention_probs_dropout_prob
        q = dense(width, "query", self.dtype)(x)
        k = dense(width, "key", self.dtype)(x)
        v = dense(width, "value", self.dtype)(x)
        probs_dropout = None
        if not deterministic and rate > 0:  # else the fused path, exactly as without dropout
            probs_dropout = nn.Dropout(rate, deterministic=False, name="dropout")
        return multi_head_attention(q, k, v, self.config.num_attention_heads, mask, probs_dropout)


class BertResidualOutput(nn.Module):
    """dense -> dropout -> (+ residual) -> LayerNorm: HF's `attention.output` and `output` blocks."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, deterministic: bool = True) -> jax.Array:
        x = dense(self.config.hidden_size, "dense", self.dtype)(x)
        x = nn.Dropout(self.config.hidden_dropout_prob, name="dropout")(x, deterministic=deterministic)
        return layer_norm(self.config.layer_norm_eps, "LayerNorm", self.dtype)(x + residual)


class BertAttention(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool = True) -> jax.Array:
        attended = BertSelfAttention(self.config, self.dtype, name="self")(x, mask, deterministic)
        return BertResidualOutput(self.config, self.dtype, name="output")(attended, x, deterministic)


class BertIntermediate(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.config.hidden_act](dense(self.config.intermediate_size, "dense", self.dtype)(x))


class BertLayer(nn.Module):
    """Post-LayerNorm block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool = True) -> jax.Array:
        x = BertAttention(self.config, self.dtype, name="attention")(x, mask, deterministic)
        h = BertIntermediate(self.config, self.dtype, name="intermediate")(x)
        return BertResidualOutput(self.config, self.dtype, name="output")(h, x, deterministic)


class BertEncoder(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, self.dtype, name=f"layer_{i}")(x, mask, deterministic)
        return x


class BertPooler(nn.Module):
    hidden_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        return jnp.tanh(dense(self.hidden_size, "dense", self.dtype)(hidden[:, 0]))


def padding_mask(attention_mask: jax.Array | None) -> jax.Array | None:
    """[batch, seq] of 1/0 -> boolean [batch, 1, 1, seq]: every query may attend the real keys."""
    if attention_mask is None:
        return None
    return attention_mask.astype(jnp.bool_)[:, None, None, :]


def check_token_inputs(config: BertConfig, input_ids: jax.Array) -> None:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected shape [batch, seq], got {tuple(input_ids.shape)}")
    if input_ids.shape[1] > config.max_position_embeddings:
        raise ValueError(
            f"input_ids: sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
            f"{config.max_position_embeddings}"
        )
    check_heads(config.hidden_size, config.num_attention_heads, "config")


class BertModel(nn.Module):
    config: BertConfig
    add_pooling_layer: bool = True
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embeddings = BertEmbeddings(self.config, self.dtype)
        self.encoder = BertEncoder(self.config, self.dtype)
        if self.add_pooling_layer:
            self.pooler = BertPooler(self.config.hidden_size, self.dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> dict[str, jax.Array]:
        """input_ids [batch, seq] -> last_hidden_state [batch, seq, width] (+ pooler_output [batch, width]).
        deterministic=False applies dropout (needs rngs={"dropout": key})."""
        check_token_inputs(self.config, input_ids)
        x = self.embeddings(input_ids, token_type_ids, deterministic)
        x = self.encoder(x, padding_mask(attention_mask), deterministic)
        out = {"last_hidden_state": x}
        if self.add_pooling_layer:
            out["pooler_output"] = self.pooler(x)
        return out


class BertPredictionTransform(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = ACTIVATIONS[cfg.hidden_act](dense(cfg.hidden_size, "dense", self.dtype)(x))
        return layer_norm(cfg.layer_norm_eps, "LayerNorm", self.dtype)(x)


class BertMLMHead(nn.Module):
    """cls.predictions: transform, then the decoder tied to the word embeddings, plus a bias."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, word_embeddings: nn.Embed) -> jax.Array:
        h = BertPredictionTransform(self.config, self.dtype, name="transform")(hidden)
        bias = self.param("bias", nn.initializers.zeros, (self.config.vocab_size,), jnp.float32)
        return word_embeddings.attend(h) + bias.astype(h.dtype)


class BertPreTrainingHeads(nn.Module):
    """The `cls` level of HF's layout, holding `predictions`."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, word_embeddings: nn.Embed) -> jax.Array:
        return BertMLMHead(self.config, self.dtype, name="predictions")(hidden, word_embeddings)


class BertForMaskedLM(nn.Module):
    """BERT with the tied masked-language-model head (µ-VLA's MLM and p-MRTC use it)."""

    config: BertConfig
    add_pooling_layer: bool = False  # transformers' BertForMaskedLM has none; µ-VLA's ITM wants one
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.bert = BertModel(self.config, self.add_pooling_layer, self.dtype)
        self.cls = BertPreTrainingHeads(self.config, self.dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> dict[str, jax.Array]:
        """Returns the BertModel outputs plus logits [batch, seq, vocab_size]."""
        out = self.bert(input_ids, attention_mask, token_type_ids, deterministic)
        out["logits"] = self.cls(out["last_hidden_state"], self.bert.embeddings.word_embeddings)
        return out
