"""The two-tower model's maths against numpy: contrastive loss, clamped temperature, prompt ensembling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlcore.clip_benchmark import class_embeddings, flatten_prompts, zero_shot_metrics
from vlcore.contrastive import contrastive_loss
from vlcore.encoders.configs import CLIPVisionConfig
from vlcore.two_tower.model import TwoTower, two_tower_loss


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_info_nce(img: np.ndarray, txt: np.ndarray, scale: float) -> float:
    logits = scale * img @ txt.T

    def xent(l):  # mean over rows of -log softmax at the diagonal
        l = l - l.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(l).sum(axis=1)) - np.diag(l)))

    return 0.5 * (xent(logits) + xent(logits.T))


def test_contrastive_loss_matches_numpy():
    rng = np.random.default_rng(0)
    img, txt = unit(rng.standard_normal((7, 5))), unit(rng.standard_normal((7, 5)))
    loss, acc = contrastive_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(4.0))
    assert float(loss) == pytest.approx(numpy_info_nce(img, txt, 4.0), rel=1e-5)
    assert float(acc) == pytest.approx(np.mean(np.argmax(img @ txt.T, axis=1) == np.arange(7)))


def test_two_tower_loss_uses_unit_image_embeddings_and_clamped_scale():
    vision = CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=2, hidden_act="gelu")
    module = TwoTower(vision, embed_dim=6, log_scale_init=np.log(500.0))  # exp > 100: must clamp
    params = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3), jnp.uint8))["params"]
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    text = unit(rng.standard_normal((4, 6))).astype(np.float32)
    embeds, scale = module.apply({"params": params}, images)
    assert np.allclose(np.linalg.norm(np.asarray(embeds), axis=1), 1.0, atol=1e-5)
    assert float(scale) == pytest.approx(100.0)
    loss, metrics = two_tower_loss(module, params, {"image": images, "text_embedding": text})
    assert float(loss) == pytest.approx(numpy_info_nce(np.asarray(embeds), text, 100.0), rel=1e-5)
    assert float(metrics["logit_scale"]) == pytest.approx(100.0)


def test_class_embeddings_average_templates_then_normalise():
    rng = np.random.default_rng(3)
    table = {f"p{i}": unit(rng.standard_normal(4)) for i in range(5)}
    prompts, counts = flatten_prompts([["p0", "p1"], ["p2"], ["p3", "p4", "p0"]])
    assert counts == [2, 1, 3]
    got = class_embeddings(np.stack([table[p] for p in prompts]), counts)
    want = np.stack([unit(table["p0"] + table["p1"]), table["p2"], unit(table["p3"] + table["p4"] + table["p0"])])
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="at least one prompt"):
        flatten_prompts([["p0"], []])


def test_zero_shot_metrics_on_known_geometry():
    classes = np.eye(3)
    images = unit(np.array([[1.0, 0.1, 0], [0, 1, 0.2], [0.9, 0, 1.0], [0, 0.1, 1]]))
    result = zero_shot_metrics(images @ classes.T, np.array([0, 1, 0, 2]), ks=(1, 3))
    assert result["acc1"] == pytest.approx(0.75)  # the third image is closer to class 2
    assert result["acc3"] == 1.0
    assert result["mean_per_class_recall"] == pytest.approx((0.5 + 1 + 1) / 3)
