"""RECO's fusion φ against a PyTorch TransformerEncoderLayer reference, its invariances, and its ablations."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import assert_close
from jaxreco.fusion import (
    PAPER_FUSION, Fusion, FusionConfig, fusion_param_count, mean_fusion, param_count,
    zero_fusion_branch,
)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_inputs(seed: int, batch: int, k: int, dim: int, masked: bool):
    rng = np.random.default_rng(seed)
    query = unit(rng.standard_normal((batch, dim))).astype(np.float32)
    retrieved = unit(rng.standard_normal((batch, k, dim))).astype(np.float32)
    mask = None
    if masked:
        mask = rng.random((batch, k)) < 0.6
        mask[0, :] = False  # a query with no valid neighbour
        mask[-1, :] = True
    return query, retrieved, mask


def random_params(module, query, retrieved, seed: int, scale: float = 0.2):
    """Random params of the module's shapes, filled on the host (no XLA compile, which dominates a tiny init).

    LayerNorm scales around 1, everything else (biases, segment embeddings, gate) N(0, scale^2), kernels
    N(0, 1/fan_in), so nothing is trivially 0 or 1.
    """
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(query), jnp.asarray(retrieved))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        x = rng.standard_normal(leaf.shape)
        if name.endswith("['kernel']"):
            x = x / np.sqrt(leaf.shape[0])
        elif name.endswith("['scale']"):
            x = 1.0 + scale * x
        else:
            x = scale * x
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def compiled(module_cls, cfg: FusionConfig, **kwargs):
    """One jitted apply per module config, shared by the tests: XLA compiles, not the maths, dominate here."""
    module = module_cls(cfg, **kwargs)
    return jax.jit(lambda params, query, retrieved, mask=None: module.apply({"params": params}, query, retrieved, mask))


class TorchFusion(torch.nn.Module):
    """The same φ written with torch's stock pre-LN encoder layer (full sequence, packed in-projection)."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        self.in_proj = torch.nn.Linear(cfg.dim, cfg.width) if cfg.width != cfg.dim else None
        self.segment = torch.nn.Parameter(torch.zeros(2, cfg.width))
        self.layer = torch.nn.TransformerEncoderLayer(
            d_model=cfg.width, nhead=cfg.num_heads, dim_feedforward=cfg.mlp_hidden, dropout=0.0, activation="gelu",
            layer_norm_eps=cfg.layer_norm_eps, batch_first=True, norm_first=True,
        )
        self.ln_final = torch.nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.out_proj = torch.nn.Linear(cfg.width, cfg.dim) if cfg.width != cfg.dim else None
        self.gate = torch.nn.Parameter(torch.zeros(())) if cfg.residual else None

    def load_flax(self, params) -> "TorchFusion":
        t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float64)  # noqa: E731
        attn = params["attn"]

        def linear(module: torch.nn.Linear, p):
            module.weight.copy_(t(p["kernel"]).T)
            module.bias.copy_(t(p["bias"]))

        def norm(module: torch.nn.LayerNorm, p):
            module.weight.copy_(t(p["scale"]))
            module.bias.copy_(t(p["bias"]))

        self.double()
        with torch.no_grad():
            if self.in_proj is not None:
                linear(self.in_proj, params["in_proj"])
            if self.out_proj is not None:
                linear(self.out_proj, params["out_proj"])
            if self.gate is not None:
                self.gate.copy_(t(params["gate"]))
            self.segment.copy_(t(params["segment_embed"]))
            sa = self.layer.self_attn
            sa.in_proj_weight.copy_(torch.cat([t(attn[n]["kernel"]).T for n in ("q_proj", "k_proj", "v_proj")]))
            sa.in_proj_bias.copy_(torch.cat([t(attn[n]["bias"]) for n in ("q_proj", "k_proj", "v_proj")]))
            linear(sa.out_proj, attn["out_proj"])
            linear(self.layer.linear1, params["mlp_fc1"])
            linear(self.layer.linear2, params["mlp_fc2"])
            norm(self.layer.norm1, params["ln_1"])
            norm(self.layer.norm2, params["ln_2"])
            norm(self.ln_final, params["ln_final"])
        return self.eval()

    @torch.no_grad()
    def forward(self, query, retrieved, mask):
        query, retrieved = torch.tensor(query, dtype=torch.float64), torch.tensor(retrieved, dtype=torch.float64)
        tokens = torch.cat([query[:, None], retrieved], dim=1)
        if self.in_proj is not None:
            tokens = self.in_proj(tokens)
        tokens = tokens + self.segment[torch.tensor([0] + [1] * retrieved.shape[1])]
        padding = None
        if mask is not None:  # torch's key padding mask: True = ignore
            padding = ~torch.cat([torch.ones(len(query), 1, dtype=torch.bool), torch.tensor(mask)], dim=1)
        x = self.ln_final(self.layer(tokens, src_key_padding_mask=padding)[:, 0])
        if self.out_proj is not None:
            x = self.out_proj(x)
        if self.gate is not None:
            x = query + self.gate * x
        return (x / x.norm(dim=-1, keepdim=True)).numpy()


CONFIGS = [  # (config, k' passed, masked); the later tests reuse these shapes, so their compiles too
    (FusionConfig(dim=16, width=16, num_heads=4, mlp_ratio=4, k=6, residual=False), 6, False),
    (FusionConfig(dim=16, width=16, num_heads=2, mlp_ratio=2, k=6, residual=True, gate_init=0.5), 6, True),
    (FusionConfig(dim=12, width=24, num_heads=3, mlp_ratio=3, k=8, residual=False), 5, True),
    (FusionConfig(dim=24, width=16, num_heads=4, mlp_ratio=4, k=4, residual=True), 4, False),
    (FusionConfig(dim=8, width=16, num_heads=2, mlp_ratio=1.5, k=3, residual=True), 0, False),
]
BATCH = 5


def config_case(index: int, seed: int):
    cfg, num_retrieved, masked = CONFIGS[index]
    query, retrieved, mask = random_inputs(seed, BATCH, num_retrieved, cfg.dim, masked)
    return cfg, query, retrieved, mask, random_params(Fusion(cfg), query, retrieved, seed)


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_fusion_matches_torch_encoder_layer(index):
    cfg, query, retrieved, mask, params = config_case(index, seed=index)
    reference = TorchFusion(cfg).load_flax(params)(query, retrieved, mask)
    out = compiled(Fusion, cfg)(params, query, retrieved, mask)
    assert out.dtype == jnp.float32 and out.shape == (BATCH, cfg.dim)
    assert_close(out, reference, atol=1e-5, what=f"fusion {cfg}")
    assert np.allclose(np.linalg.norm(np.asarray(out), axis=1), 1.0, atol=1e-6)


def test_torch_reference_depends_on_segments_and_masks():
    # Guards the reference itself: a wrong segment id or an ignored mask must show up as a difference.
    cfg, query, retrieved, mask, params = config_case(1, seed=1)
    out = np.asarray(compiled(Fusion, cfg)(params, query, retrieved, mask))
    assert np.abs(out - TorchFusion(cfg).load_flax(params)(query, retrieved, None)).max() > 1e-3
    swapped = dict(params, segment_embed=params["segment_embed"][::-1])
    assert np.abs(out - TorchFusion(cfg).load_flax(swapped)(query, retrieved, mask)).max() > 1e-3


def test_permuting_neighbours_leaves_the_output_unchanged():
    cfg, query, retrieved, mask, params = config_case(1, seed=11)
    apply = compiled(Fusion, cfg)
    perm = np.random.default_rng(0).permutation(retrieved.shape[1])
    assert not np.array_equal(perm, np.arange(len(perm)))
    for m in (None, mask):
        out = apply(params, query, retrieved, m)
        shuffled = apply(params, query, retrieved[:, perm], None if m is None else m[:, perm])
        assert_close(shuffled, out, atol=1e-6, what="permuted neighbours")
        # ...while other neighbours (another row's) do change it, so the invariance is not vacuous.
        other = apply(params, query, retrieved[::-1], None if m is None else m[::-1])
        assert np.abs(np.asarray(other) - np.asarray(out)).max() > 1e-3


def test_masked_neighbours_do_not_affect_the_output():
    cfg, query, retrieved, mask, params = config_case(1, seed=12)
    apply = compiled(Fusion, cfg)
    out = apply(params, query, retrieved, mask)
    changed = np.where(mask[..., None], retrieved, 100.0 * np.random.default_rng(1).standard_normal(retrieved.shape))
    assert_close(apply(params, query, changed.astype(np.float32), mask), out, atol=1e-7, what="masked values changed")
    # All neighbours masked (row 0) is the same as passing none; the other rows do use theirs.
    none = apply(params, query, retrieved[:, :0])
    assert not mask[0].any() and mask[1:].any(axis=1).all()
    assert_close(out[0], none[0], atol=1e-6, what="all masked vs k'=0")
    assert np.abs(np.asarray(out[1:]) - np.asarray(none[1:])).max(axis=1).min() > 1e-4


@pytest.mark.parametrize("index,zeroed_map", [(1, "ln_final"), (3, "out_proj")])
def test_zero_branch_gives_the_normalised_query(index, zeroed_map):
    cfg, query, retrieved, _, params = config_case(index, seed=13)
    assert cfg.residual and (cfg.width != cfg.dim) == (zeroed_map == "out_proj")
    query = 1.3 * query  # not unit norm, so the normalisation is visible
    apply = compiled(Fusion, cfg)
    zeroed = zero_fusion_branch(params)
    expected = query / np.linalg.norm(query, axis=1, keepdims=True)
    assert np.abs(np.asarray(apply(zeroed, query, retrieved)) - expected).max() <= 1e-7
    assert np.abs(np.asarray(apply(params, query, retrieved)) - expected).max() > 1e-3
    # Only the branch's last affine map was zeroed, the rest is as it was.
    changed = [name for name in params if not all(np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(params[name]), jax.tree_util.tree_leaves(zeroed[name])))]
    assert changed == [zeroed_map]
    assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(zeroed[zeroed_map]))
    # Training from there is not stuck: the gradient reaches the zeroed map.
    grads = jax.jit(jax.grad(lambda p: apply(p, query, retrieved)[:, 0].sum()))(zeroed)
    assert max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(grads[zeroed_map])) > 1e-4


def test_zero_branch_refuses_non_residual_params():
    cfg, query, retrieved, _, params = config_case(0, seed=0)
    with pytest.raises(ValueError, match="residual"):
        zero_fusion_branch(params)


def test_shape_errors():
    cfg, query, retrieved, _, params = config_case(0, seed=0)
    apply = compiled(Fusion, cfg)
    with pytest.raises(ValueError, match="more than the configured k=6"):
        apply(params, query, np.ones((BATCH, 7, 16), np.float32))
    with pytest.raises(ValueError, match="query must be"):
        apply(params, query[:, :15], retrieved)
    with pytest.raises(ValueError, match="retrieved must be"):
        apply(params, query, retrieved[:3])
    with pytest.raises(ValueError, match="retrieved_mask must be"):
        apply(params, query, retrieved, np.ones((BATCH, 5), bool))
    with pytest.raises(ValueError, match="divisible"):
        FusionConfig(dim=8, width=10, num_heads=4)
    with pytest.raises(ValueError, match="dropout"):
        FusionConfig(dim=8, width=8, num_heads=2, dropout=0.1)


def transformer_layer_count(dim: int, width: int, hidden: int, residual: bool) -> int:
    """By hand: in/out projections, segments, attention, MLP, three LayerNorms, gate."""
    proj = (dim * width + width) + (width * dim + dim) if width != dim else 0
    attention, mlp = 4 * (width * width + width), 2 * width * hidden + hidden + width
    return proj + 2 * width + attention + mlp + 3 * 2 * width + residual


def test_paper_fusion_has_the_papers_size():
    count = fusion_param_count(PAPER_FUSION)
    assert count == transformer_layer_count(512, 512, 2048, PAPER_FUSION.residual) == 3_154_432
    assert abs(count - 3.16e6) / 3.16e6 < 0.01
    assert fusion_param_count(FusionConfig(dim=384, width=384, num_heads=6)) == 1_776_000


def test_mean_fusion_against_numpy():
    query, retrieved, mask = random_inputs(8, 6, 5, 8, masked=True)
    expected = unit(query + retrieved.mean(1))
    assert_close(mean_fusion(jnp.asarray(query), jnp.asarray(retrieved)), expected, atol=1e-6, what="mean_fusion")
    masked = np.stack([unit(q + (r[m].mean(0) if m.any() else 0.0)) for q, r, m in zip(query, retrieved, mask)])
    assert_close(mean_fusion(jnp.asarray(query), jnp.asarray(retrieved), jnp.asarray(mask)), masked, atol=1e-6,
                 what="masked mean_fusion")
    assert_close(mean_fusion(query, retrieved[:, :0]), unit(query), atol=1e-7, what="no neighbours")


@pytest.mark.parametrize("dim,width,heads,ratio,residual", [(384, 384, 4, 2.0, True), (512, 512, 8, 4.0, False),
                                                            (48, 96, 4, 2.0, True)])
def test_query_mlp_has_the_fusion_size_and_ignores_the_neighbours(dim, width, heads, ratio, residual):
    from jaxreco.fusion import QueryMLP, fusion_param_count, param_count

    config = FusionConfig(dim=dim, width=width, num_heads=heads, mlp_ratio=ratio, k=4, residual=residual)
    module = QueryMLP(config)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    nb = rng.standard_normal((3, 4, dim)).astype(np.float32)
    params = module.init(jax.random.key(1), q, nb)["params"]
    assert abs(param_count(params) - fusion_param_count(config)) <= 2 * dim + 1  # within one hidden unit
    out = np.asarray(module.apply({"params": params}, q, nb))
    np.testing.assert_allclose(out, module.apply({"params": params}, q, -nb), atol=0)  # no retrieval
    # numpy reference: gelu(q W1 + b1) W2 + b2, then the residual gate or plain normalisation
    from scipy.special import erf

    h = q @ np.asarray(params["fc1"]["kernel"]) + np.asarray(params["fc1"]["bias"])
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    branch = h @ np.asarray(params["fc2"]["kernel"]) + np.asarray(params["fc2"]["bias"])
    ref = q + float(params["gate"]) * branch if residual else branch
    np.testing.assert_allclose(out, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
