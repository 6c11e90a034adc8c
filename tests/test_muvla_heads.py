"""µ-VLA's downstream models against independent computations: the encoder is MuVLA's (same
parameters, same outputs), NLVR2 concatenates the two images' pooled outputs, RefCOCO+ scores
every region token and never a padding one, the losses equal their numpy formulas, IoU equals a
hand computation, and a vocabulary extended for a task keeps every pre-trained id."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmuvla.finetune import iou
from jaxmuvla.heads import DownstreamModel
from jaxmuvla.model import MuVLA, init_muvla
from jaxmuvla.vocabulary import Vocabulary, extend_word_embeddings
from vlcore.encoders.configs import VisualBertConfig

H, D, R, L = 32, 12, 5, 7


def small_config() -> VisualBertConfig:
    return VisualBertConfig(vocab_size=50, hidden_size=H, visual_embedding_dim=D, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64, max_position_embeddings=32)


def inputs(rng, b, pair=False):
    shape = (b, 2) if pair else (b,)
    ids = rng.integers(5, 50, (*shape, L)).astype(np.int32)
    mask = np.ones((*shape, L), bool)
    mask[..., L - 2:] = False  # padding at the end
    features = rng.normal(size=(*shape, R, D)).astype(np.float32)
    boxes = rng.random((*shape, R, 5)).astype(np.float32)
    region_mask = np.ones((*shape, R), bool)
    region_mask[..., R - 1] = False
    region_mask[0, ..., R - 2] = False
    return ids, mask, features, boxes, region_mask


@pytest.fixture(scope="module")
def muvla():
    cfg = small_config()
    module = MuVLA(cfg, num_classes=6, pooling="mean")
    return module, jax.device_get(init_muvla(module, seed=3))


def downstream(cfg, task, outputs, muvla_params, rng, pair=False):
    model = DownstreamModel(cfg, task, outputs, True, "mean")
    params = jax.device_get(model.init(jax.random.key(1), *inputs(rng, 2, pair))["params"])
    params = {**params, "visual_bert": muvla_params["visual_bert"], "box_embedding": muvla_params["box_embedding"]}
    return model, params


@pytest.mark.parametrize("task,outputs", [("vqa", 9), ("ve", 3)])
def test_pooled_heads_read_muvla_pooled_output(muvla, task, outputs):
    module, mp = muvla
    rng = np.random.default_rng(0)
    model, params = downstream(module.config, task, outputs, mp, rng)
    x = inputs(rng, 3)
    _, pooled = module.apply({"params": mp}, x[0], x[1], None, None, x[2], x[3], x[4], method=MuVLA.encode)
    expected = model.apply({"params": params}, pooled, method=lambda m, p: m.head(p))
    got = model.apply({"params": params}, *x)
    assert got.shape == (3, outputs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def numpy_mlp(p, x):
    h = x @ p["dense"]["kernel"] + p["dense"]["bias"]
    h = 0.5 * h * (1 + np.vectorize(__import__("math").erf)(h / np.sqrt(2)))  # exact GELU
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mu) / np.sqrt(var + 1e-12) * p["LayerNorm"]["scale"] + p["LayerNorm"]["bias"]
    return h @ p["out"]["kernel"] + p["out"]["bias"]


def test_nlvr2_concatenates_the_two_images_pooled_outputs(muvla):
    module, mp = muvla
    rng = np.random.default_rng(1)
    model, params = downstream(module.config, "nlvr2", 2, mp, rng, pair=True)
    x = inputs(rng, 3, pair=True)
    pooled = []
    for side in range(2):  # each image with the sentence, through MuVLA separately
        _, p = module.apply({"params": mp}, x[0][:, side], x[1][:, side], None, None, x[2][:, side], x[3][:, side],
                            x[4][:, side], method=MuVLA.encode)
        pooled.append(np.asarray(p, np.float64))
    head = jax.tree.map(lambda a: np.asarray(a, np.float64), params["head"])
    expected = numpy_mlp(head, np.concatenate(pooled, -1))
    got = model.apply({"params": params}, *x)
    assert got.shape == (3, 2)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4)
    swapped = model.apply({"params": params}, *(a[:, ::-1] for a in x))  # left/right order matters
    assert not np.allclose(np.asarray(swapped), np.asarray(got), atol=1e-4)


def test_refcoco_scores_each_region_token_and_masks_padding(muvla):
    module, mp = muvla
    rng = np.random.default_rng(2)
    model, params = downstream(module.config, "refcoco", 1, mp, rng)
    x = inputs(rng, 3)
    hidden, _ = module.apply({"params": mp}, x[0], x[1], None, None, x[2], x[3], x[4], method=MuVLA.encode)
    head = jax.tree.map(lambda a: np.asarray(a, np.float64), params["head"])
    expected = numpy_mlp(head, np.asarray(hidden, np.float64)[:, L:])[..., 0]
    got = np.asarray(model.apply({"params": params}, *x))
    assert got.shape == (3, R)
    np.testing.assert_allclose(got[x[4]], expected[x[4]], atol=1e-4)
    assert (got[~x[4]] <= -1e8).all()  # a padding region can never be chosen
    assert got[0].argmax() not in (R - 2, R - 1)


def test_losses_equal_numpy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 5))
    soft = rng.choice([0, 1 / 3, 2 / 3, 1.0], (6, 5))
    sig = 1 / (1 + np.exp(-logits))
    bce = -(soft * np.log(sig) + (1 - soft) * np.log(1 - sig)).sum(-1).mean()
    got = optax.sigmoid_binary_cross_entropy(jnp.asarray(logits), jnp.asarray(soft)).sum(-1).mean()
    np.testing.assert_allclose(float(got), bce, rtol=1e-5)


def test_iou_by_hand():
    a = np.array([0.0, 0.0, 0.5, 0.5])
    assert iou(a, a) == pytest.approx(1.0)
    assert iou(a, np.array([0.25, 0.0, 0.75, 0.5])) == pytest.approx(0.125 / 0.375)  # half overlap
    assert iou(a, np.array([0.5, 0.5, 1.0, 1.0])) == 0.0  # touching corners
    # invariant to scaling each axis: normalised boxes give the pixel IoU
    px = iou(np.array([10, 20, 50, 60.0]), np.array([30, 20, 70, 80.0]))
    norm = iou(np.array([10 / 640, 20 / 480, 50 / 640, 60 / 480]), np.array([30 / 640, 20 / 480, 70 / 640, 80 / 480]))
    assert px == pytest.approx((20 * 40) / (40 * 40 + 40 * 60 - 20 * 40)) and norm == pytest.approx(px)


class FakeTokenizer:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    all_special_tokens = ["[PAD]", "[UNK]"]
    unk_token_id = 1

    def convert_tokens_to_ids(self, t):
        return {"[PAD]": 0, "[UNK]": 1}[t]

    def convert_ids_to_tokens(self, ids):
        return [f"tok{i}" for i in ids]


def test_extended_vocabulary_keeps_pretrained_ids_and_takes_new_rows_from_the_full_table():
    tok = FakeTokenizer(100)
    base = Vocabulary.from_ids(tok, [np.array([7, 3, 50])])
    ext = base.extended(tok, [np.array([3, 90, 60, 7])])
    np.testing.assert_array_equal(ext.keep[:base.size], base.keep)  # every old piece keeps its id
    assert list(ext.keep[base.size:]) == [60, 90]
    np.testing.assert_array_equal(ext.map(np.array([3, 7, 50])), base.map(np.array([3, 7, 50])))
    assert ext.map(np.array([60, 90, 55])).tolist() == [base.size, base.size + 1, 1]  # 55: still [UNK]
    full = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    trained = full[base.keep] + 1.0  # pre-training moved the kept rows
    params = {"visual_bert": {"embeddings": {"word_embeddings": {"embedding": trained}}}}
    out = extend_word_embeddings(params, base, ext, full)["visual_bert"]["embeddings"]["word_embeddings"]["embedding"]
    np.testing.assert_array_equal(out[:base.size], trained)
    np.testing.assert_array_equal(out[base.size:], full[[60, 90]])
