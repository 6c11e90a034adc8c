"""Building blocks shared by the Flax CLIP and BERT encoders."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn


def quick_gelu(x: jax.Array) -> jax.Array:
    # OpenAI CLIP's approximation; its checkpoints were trained with it, so it must match exactly.
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 0.0) -> jax.Array:
    """x / max(||x||, eps) along `axis`: the one L2 normalisation of the project (numpy input works too).

    eps=0 divides by the plain norm, as transformers' CLIP does (keeps parity on tiny embeddings);
    sentence-transformers uses torch.nn.functional.normalize, i.e. eps=1e-12, so an all-zero row
    stays zero instead of becoming NaN.
    """
    norm = jnp.linalg.norm(x, axis=axis, keepdims=True)
    return x / (jnp.maximum(norm, eps) if eps else norm)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """[batch, seq, heads*head_dim] -> [batch, seq, heads, head_dim]."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def multi_head_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    num_heads: int,
    mask: jax.Array | None,
    probs_dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Scaled dot-product attention over already projected [batch, seq, width] tensors.

    mask: boolean, broadcastable to [batch, heads, q_len, k_len]; True = may attend.
    probs_dropout: applied to the probabilities [batch, heads, q_len, k_len] before they weight
    the values (BERT's attention dropout); None = no dropout.
    Softmax runs in float32 whatever the compute dtype (jax.nn.dot_product_attention does so).
    Returns [batch, q_len, width].
    """
    q, k, v = split_heads(q, num_heads), split_heads(k, num_heads), split_heads(v, num_heads)
    if probs_dropout is None:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    else:  # the same computation spelled out, since jax.nn.dot_product_attention has no dropout
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(q.shape[-1])
        if mask is not None:
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = probs_dropout(jax.nn.softmax(scores, axis=-1)).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.reshape(*out.shape[:-2], -1)


def dense(features: int, name: str, dtype: jnp.dtype, use_bias: bool = True) -> nn.Dense:
    # Parameters stay float32 whatever the compute dtype: bf16 is an activation option only.
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def layer_norm(eps: float, name: str, dtype: jnp.dtype) -> nn.LayerNorm:
    # Two-pass variance, as PyTorch computes it: the one-pass form loses digits on large activations.
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name)
