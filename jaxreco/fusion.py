"""RECO's fusion φ: one transformer layer that refines a frozen embedding with its retrieved neighbours.

The query embedding (an image or a text, unit norm) and the k embeddings of the other modality
fetched for it from the memory form the tokens [query, retrieved_1..k]; one pre-LN transformer
encoder layer mixes them and the output at the query token, L2-normalised, is the refined embedding.

Also here: the two ablations of the paper that replace φ, an MLP of the same size on the query
alone (`QueryMLP`) and the untrained mean of the neighbours (`mean_fusion`), and the paper-sized
preset `PAPER_FUSION`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from vlcore.encoders.layers import dense, l2_normalize, layer_norm

QUERY_SEGMENT, RETRIEVED_SEGMENT = 0, 1


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """Shape of a fusion module.

    dim: embedding size, of the input query and neighbours and of the output.
    width: transformer width; when it differs from `dim`, `in_proj` (dim -> width) maps the tokens in
      and `out_proj` (width -> dim) maps the query token out.
    num_heads, mlp_ratio: attention heads; the MLP hidden size is mlp_ratio * width.
    k: the most neighbours a call may pass (any k' in [0, k] works); no parameter depends on it,
      since the neighbours carry no position (see `Fusion`).
    residual: output normalize(query + gate * branch) with a learned scalar `gate` initialised to
      `gate_init`, instead of normalize(branch). The branch ends in LayerNorm, so its norm is about
      sqrt(width) and with the default gate_init=1.0 it dominates the unit-norm query at
      initialisation; a small gate_init starts closer to the frozen embedding.
    dropout: reserved; only 0.0 is implemented.
    layer_norm_eps: PyTorch's default, so a `torch.nn.TransformerEncoderLayer` is a reference.
    dtype: compute dtype; parameters stay float32 and the output is float32.
    """

    dim: int
    width: int
    num_heads: int = 8
    mlp_ratio: float = 4.0
    k: int = 10
    residual: bool = False
    gate_init: float = 1.0
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.dim < 1 or self.width < 1 or self.num_heads < 1:
            raise ValueError(f"dim, width, num_heads must be positive, got {self.dim}, {self.width}, {self.num_heads}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.mlp_hidden < 1:
            raise ValueError(f"mlp_ratio {self.mlp_ratio} gives an empty MLP for width {self.width}")
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if self.dropout != 0.0:
            raise ValueError(f"dropout {self.dropout} is not implemented; only 0.0 is")

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.mlp_ratio * self.width))


# CLIP ViT-B/32 embeddings (512-d), k = 10, as in the paper. It reports 3.16M parameters; this
# layout has 3,154,432 (attention 1,050,624 + MLP 2,099,712 + three LayerNorms 3,072 + segment
# embeddings 1,024), 0.18% under. A learned position per token (11 x 512) on top would give 3,160,064,
# the paper's figure exactly: a hint its layer has positions, left out here to keep φ a set function.
# residual=False: the paper reads the refined embedding straight off the query token, whose
# transformer residual stream already carries the query.
PAPER_FUSION = FusionConfig(dim=512, width=512, num_heads=8, mlp_ratio=4.0, k=10, residual=False)


def check_fusion_inputs(query: jax.Array, retrieved: jax.Array, retrieved_mask: jax.Array | None, config: FusionConfig):
    """Raises ValueError unless query [b, dim], retrieved [b, k', dim] with k' <= k, mask [b, k']."""
    if query.ndim != 2 or query.shape[1] != config.dim:
        raise ValueError(f"query must be [batch, {config.dim}], got {query.shape}")
    if retrieved.ndim != 3 or retrieved.shape[0] != query.shape[0] or retrieved.shape[2] != config.dim:
        raise ValueError(f"retrieved must be [{query.shape[0]}, k, {config.dim}], got {retrieved.shape}")
    if retrieved.shape[1] > config.k:
        raise ValueError(f"{retrieved.shape[1]} retrieved neighbours, more than the configured k={config.k}")
    if retrieved_mask is not None and retrieved_mask.shape != retrieved.shape[:2]:
        raise ValueError(f"retrieved_mask must be {retrieved.shape[:2]}, got {retrieved_mask.shape}")


def masked_mean(retrieved: jax.Array, retrieved_mask: jax.Array | None) -> jax.Array:
    """Mean of the valid neighbours [b, k', dim] -> [b, dim]; zero where none is valid (or k' = 0)."""
    if retrieved_mask is None:
        retrieved_mask = jnp.ones(retrieved.shape[:2], bool)
    weights = retrieved_mask.astype(retrieved.dtype)[..., None]
    return (weights * retrieved).sum(1) / jnp.maximum(weights.sum(1), 1.0)


class DenseParams(nn.Module):
    """The kernel [in, out] and bias [out] of a dense layer, laid out (and initialised) as nn.Dense's,
    for a projection that is applied by reassociating it rather than to every token."""

    features: int

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return kernel, bias


class QueryAttention(nn.Module):
    """Multi-head attention of the query token over all tokens, with biased q/k/v/out projections.

    Only the query token's output is ever read, and every key and value is a linear map of its
    token, so neither is materialised: the scores are q_h . (W_k,h^T n_j + b_k,h) =
    (W_k,h q_h) . n_j + const (the constant cancels in the softmax), and the output
    sum_j a_hj (W_v,h^T n_j + b_v,h) = W_v,h^T (sum_j a_hj n_j) + b_v,h (the weights sum to one).
    The same function and parameters as the textbook layer (tested against PyTorch's), at
    O(width^2 + k * width) per query instead of O(k * width^2): RECO's step is mostly its MLP now.
    """

    config: FusionConfig

    @nn.compact
    def __call__(self, query_token: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """query_token [b, 1, width], tokens [b, 1 + k', width], mask [b, 1 + k'] (True = attend)."""
        cfg = self.config
        heads, width = cfg.num_heads, cfg.width
        head_dim = width // heads
        q = dense(width, "q_proj", cfg.dtype)(query_token[:, 0]).reshape(-1, heads, head_dim)  # [b, h, d]
        w_k, _ = DenseParams(width, name="k_proj")(width)  # the key bias shifts a whole row: no effect
        w_v, b_v = DenseParams(width, name="v_proj")(width)
        w_k = w_k.astype(cfg.dtype).reshape(width, heads, head_dim)
        w_v = w_v.astype(cfg.dtype).reshape(width, heads, head_dim)
        u = jnp.einsum("bhd,whd->bhw", q, w_k)  # the query seen through the key map
        scores = jnp.einsum("bhw,bjw->bhj", u, tokens.astype(cfg.dtype)).astype(jnp.float32) / jnp.sqrt(head_dim)
        scores = jnp.where(mask[:, None, :], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)  # [b, h, 1 + k']
        mixed = jnp.einsum("bhj,bjw->bhw", weights, tokens.astype(cfg.dtype))  # attention-weighted tokens
        out = jnp.einsum("bhw,whd->bhd", mixed, w_v) + b_v.astype(cfg.dtype).reshape(heads, head_dim)
        return dense(width, "out_proj", cfg.dtype)(out.reshape(-1, 1, width))


class Fusion(nn.Module):
    """φ: (query [b, dim] unit norm, retrieved [b, k', dim], retrieved_mask [b, k'] bool) -> [b, dim] unit norm.

    Tokens [query, retrieved_1..k'] (after `in_proj` when width != dim) get one of two learned segment
    embeddings, query or retrieved, and no position: the neighbours are a set (their order is only
    the search score's), so φ is invariant to permuting them. One pre-LN encoder layer (LayerNorm,
    self-attention, residual; LayerNorm, GELU MLP, residual), a final LayerNorm, `out_proj` when
    width != dim, then L2 normalisation (around the gated residual when config.residual).
    Masked-out neighbours (mask False) are not attended to; the query token always is.
    """

    config: FusionConfig

    @nn.compact
    def __call__(self, query: jax.Array, retrieved: jax.Array, retrieved_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        check_fusion_inputs(query, retrieved, retrieved_mask, cfg)
        batch, num_retrieved = retrieved.shape[:2]
        tokens = jnp.concatenate([query[:, None, :], retrieved], axis=1).astype(cfg.dtype)
        if cfg.width != cfg.dim:
            tokens = dense(cfg.width, "in_proj", cfg.dtype)(tokens)
        segments = self.param("segment_embed", nn.initializers.normal(0.02), (2, cfg.width), jnp.float32)
        segment_ids = jnp.array([QUERY_SEGMENT] + [RETRIEVED_SEGMENT] * num_retrieved)
        tokens = tokens + segments[segment_ids].astype(cfg.dtype)

        if retrieved_mask is None:
            retrieved_mask = jnp.ones((batch, num_retrieved), bool)
        mask = jnp.concatenate([jnp.ones((batch, 1), bool), retrieved_mask.astype(bool)], axis=1)

        normed = layer_norm(cfg.layer_norm_eps, "ln_1", cfg.dtype)(tokens)
        # Only the query token's output is read, so only its residual stream is carried on.
        x = tokens[:, :1] + QueryAttention(cfg, name="attn")(normed[:, :1], normed, mask)
        h = layer_norm(cfg.layer_norm_eps, "ln_2", cfg.dtype)(x)
        h = dense(cfg.mlp_hidden, "mlp_fc1", cfg.dtype)(h)
        h = dense(cfg.width, "mlp_fc2", cfg.dtype)(jax.nn.gelu(h, approximate=False))  # PyTorch's exact GELU
        x = layer_norm(cfg.layer_norm_eps, "ln_final", cfg.dtype)(x + h)[:, 0]
        if cfg.width != cfg.dim:
            x = dense(cfg.dim, "out_proj", cfg.dtype)(x)
        return gated_output(self, query, x.astype(jnp.float32), cfg)


def gated_output(module: nn.Module, query: jax.Array, branch: jax.Array, config: FusionConfig) -> jax.Array:
    """normalize(query + gate * branch) with a learned scalar gate when config.residual, else normalize(branch)."""
    if not config.residual:
        return l2_normalize(branch)
    gate = module.param("gate", nn.initializers.constant(config.gate_init), (), jnp.float32)
    return l2_normalize(query.astype(jnp.float32) + gate * branch)


def zero_fusion_branch(params: Any) -> Any:
    """A copy of `Fusion` (residual=True) params whose branch outputs exactly zero: φ(q, r) = normalize(q).

    Zeroes the branch's last affine map only, `out_proj` when there is one, else `ln_final`'s scale
    and bias, so training from these params still moves (a zero-init residual branch, as in ReZero).
    Without a residual the output would be normalize(0), so params lacking `gate` are refused.
    """
    if "gate" not in params:
        raise ValueError("zero_fusion_branch needs residual=True params (a 'gate'): the output would be normalize(0)")
    last = "out_proj" if "out_proj" in params else "ln_final"
    params = dict(params)
    params[last] = jax.tree_util.tree_map(jnp.zeros_like, params[last])
    return params


def param_count(params: Any) -> int:
    """Number of scalars in a parameter tree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


@functools.lru_cache(maxsize=None)
def fusion_param_count(config: FusionConfig) -> int:
    """Parameters of `Fusion(config)`, from the shapes alone (nothing is computed)."""
    module = Fusion(config)
    shapes = jax.eval_shape(
        module.init, jax.random.key(0), jnp.zeros((1, config.dim)), jnp.zeros((1, config.k, config.dim))
    )
    return param_count(shapes["params"])


def query_mlp_hidden_for(config: FusionConfig) -> int:
    """Hidden size h giving `QueryMLP` (dim -> h -> dim, plus a gate when residual) as many parameters
    as `Fusion(config)`, to one hidden unit: dim*h + h (fc1) + h*dim + dim (fc2) = (2*dim + 1)*h + dim."""
    extra = config.dim + (1 if config.residual else 0)
    return max(1, round((fusion_param_count(config) - extra) / (2 * config.dim + 1)))


class QueryMLP(nn.Module):
    """The paper's control for RECO's gain: an MLP of the fusion's size on the query alone, trained
    on the same data with the same loss, *without* retrieval (dim -> hidden -> dim, with the same
    residual/gate as `Fusion`). The neighbours are accepted for a common signature and ignored.
    """

    config: FusionConfig
    hidden: int | None = None

    @nn.compact
    def __call__(self, query: jax.Array, retrieved: jax.Array, retrieved_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        check_fusion_inputs(query, retrieved, retrieved_mask, cfg)
        h = dense(self.hidden or query_mlp_hidden_for(cfg), "fc1", cfg.dtype)(query.astype(cfg.dtype))
        h = jax.nn.gelu(h, approximate=False)
        return gated_output(self, query, dense(cfg.dim, "fc2", cfg.dtype)(h).astype(jnp.float32), cfg)


def mean_fusion(query: jax.Array, retrieved: jax.Array, retrieved_mask: jax.Array | None = None) -> jax.Array:
    """The untrained ablation: normalize(query + mean of the valid neighbours), [b, dim] -> [b, dim].

    The unit-norm query and the neighbours' centroid get equal weight; the centroid is not
    renormalised, so neighbours that disagree (a short mean) pull the query less. No neighbour
    (k' = 0 or all masked) leaves normalize(query).
    """
    if query.ndim != 2 or retrieved.ndim != 3 or retrieved.shape[::2] != query.shape:
        raise ValueError(f"need query [b, dim] and retrieved [b, k, dim], got {query.shape} and {retrieved.shape}")
    if retrieved_mask is not None and retrieved_mask.shape != retrieved.shape[:2]:
        raise ValueError(f"retrieved_mask must be {retrieved.shape[:2]}, got {retrieved_mask.shape}")
    return l2_normalize(query + masked_mean(retrieved, retrieved_mask))
