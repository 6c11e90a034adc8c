"""RECO's loss against numpy and finite differences; its metrics against sklearn, loops and clip_benchmark's recipe."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from jaxreco.losses import reco_loss
from vlcore.clip_benchmark import retrieval_metrics, zero_shot_metrics
from vlcore.contrastive import LogitScale, contrastive_loss


def info_nce(a, b, scale):
    return contrastive_loss(a, b, scale)[0]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_info_nce(a: np.ndarray, b: np.ndarray, scale: float) -> float:
    logits = scale * a.astype(np.float64) @ b.astype(np.float64).T

    def xent(l):  # mean over rows of -log_softmax(l)[i, i]
        log_softmax = l - l.max(1, keepdims=True)
        log_softmax = log_softmax - np.log(np.exp(log_softmax).sum(1, keepdims=True))
        return -np.mean(np.diag(log_softmax))

    return 0.5 * (xent(logits) + xent(logits.T))


# ---------------------------------------------------------------------------------------------- loss


def test_reco_loss_matches_numpy():
    rng = np.random.default_rng(0)
    ri, rt, i, t = (unit(rng.standard_normal((9, 6))).astype(np.float32) for _ in range(4))
    scale = 7.5
    loss, metrics = jax.jit(reco_loss)(ri, rt, i, t, jnp.float32(scale))
    terms = {
        "loss_refined_refined": numpy_info_nce(ri, rt, scale),
        "loss_refined_image_text": numpy_info_nce(ri, t, scale),
        "loss_image_refined_text": numpy_info_nce(i, rt, scale),
    }
    for name, expected in terms.items():
        assert float(metrics[name]) == pytest.approx(expected, abs=1e-5), name
    assert float(loss) == pytest.approx(sum(terms.values()), abs=1e-5)
    assert float(info_nce(ri, t, scale)) == pytest.approx(terms["loss_refined_image_text"], abs=1e-5)
    # The terms differ, so a swapped argument would show.
    assert min(abs(a - b) for a in terms.values() for b in terms.values() if a is not b) > 1e-3
    assert float(metrics["batch_i2t_acc"]) == pytest.approx(np.mean(np.argmax(ri @ rt.T, 1) == np.arange(9)))


def test_reco_loss_accuracy_is_one_for_aligned_pairs():
    x = unit(np.random.default_rng(1).standard_normal((5, 8))).astype(np.float32)
    _, metrics = reco_loss(x, x, x, x, jnp.float32(10.0))
    assert float(metrics["batch_i2t_acc"]) == 1.0


def test_info_nce_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    with jax.enable_x64(True):
        grad_a, grad_scale = jax.grad(info_nce, argnums=(0, 2))(jnp.asarray(a), jnp.asarray(b), jnp.float64(2.5))
        f = lambda a_, s: float(info_nce(jnp.asarray(a_), jnp.asarray(b), jnp.float64(s)))  # noqa: E731
        eps = 1e-6
        numeric = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            step = np.zeros_like(a)
            step[idx] = eps
            numeric[idx] = (f(a + step, 2.5) - f(a - step, 2.5)) / (2 * eps)
        numeric_scale = (f(a, 2.5 + eps) - f(a, 2.5 - eps)) / (2 * eps)
    assert grad_a.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(grad_a), numeric, atol=1e-8)
    assert float(grad_scale) == pytest.approx(numeric_scale, abs=1e-8)
    # And against torch autograd of the same formula.
    ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b)
    logits = 2.5 * ta @ tb.T
    labels = torch.arange(4)
    xent = torch.nn.functional.cross_entropy
    loss = 0.5 * (xent(logits, labels) + xent(logits.T, labels))
    loss.backward()
    np.testing.assert_allclose(np.asarray(grad_a), ta.grad.numpy(), atol=1e-10)


def test_logit_scale_init_and_clamp():
    module = LogitScale()
    params = module.init(jax.random.key(0))
    assert float(params["params"]["log_scale"]) == pytest.approx(np.log(1 / 0.07))
    assert float(module.apply(params)) == pytest.approx(1 / 0.07, rel=1e-6)
    assert float(module.apply({"params": {"log_scale": jnp.float32(np.log(500.0))}})) == 100.0


def test_loss_shape_errors():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="refined_image vs text"):
        reco_loss(x, x, x, np.ones((5, 3), np.float32), 1.0)
    with pytest.raises(ValueError, match="contrastive_loss"):
        info_nce(x, np.ones((4, 2), np.float32), 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        info_nce(x[:0], x[:0], 1.0)


# ------------------------------------------------------------------------------------- zero-shot


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # on purpose: see below
@pytest.mark.parametrize("seed", range(3))
def test_zero_shot_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    classes = 12
    present = rng.choice(classes, size=8, replace=False)  # four classes never occur in the labels
    labels = rng.choice(present, size=200)
    logits = rng.standard_normal((200, classes)) + 1.5 * np.eye(classes)[labels]  # better than chance
    assert not np.isin(logits.argmax(1), present).all()  # some predictions name a class absent from the labels
    metrics = zero_shot_metrics(logits, labels)
    assert set(metrics) == {"acc1", "acc5", "mean_per_class_recall"}
    for k in (1, 5):
        assert metrics[f"acc{k}"] == pytest.approx(top_k_accuracy_score(labels, logits, k=k, labels=range(classes)))
    expected = balanced_accuracy_score(labels, logits.argmax(1))
    assert metrics["mean_per_class_recall"] == pytest.approx(expected)
    assert metrics["mean_per_class_recall"] != pytest.approx(metrics["acc1"])  # unbalanced labels: they differ
    assert zero_shot_metrics(logits, labels, ks=(3,))["acc3"] == pytest.approx(
        top_k_accuracy_score(labels, logits, k=3, labels=range(classes)))


def test_zero_shot_ties_rank_the_lower_class_first():
    logits = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 5.0, 5.0, 5.0]])
    labels = np.array([2, 0, 3])
    metrics = zero_shot_metrics(logits, labels, ks=(1, 2, 3))
    # Row 0: order 1, 2 -> label 2 at rank 1. Row 1: order 0, 1, 2, 3 -> rank 0. Row 2: order 1, 2, 3 -> rank 2.
    assert metrics == {"acc1": pytest.approx(1 / 3), "acc2": pytest.approx(2 / 3), "acc3": 1.0,
                       "mean_per_class_recall": pytest.approx(1 / 3)}  # recalls: class 0 1, class 2 0, class 3 0


def test_zero_shot_errors():
    logits, labels = np.zeros((4, 6)), np.array([0, 1, 2, 5])
    with pytest.raises(ValueError, match="labels must be"):
        zero_shot_metrics(logits, labels[:3])
    with pytest.raises(ValueError, match="out of range"):
        zero_shot_metrics(logits, np.array([0, 1, 2, 6]))
    with pytest.raises(ValueError, match="out of range"):
        zero_shot_metrics(logits, np.array([0, -1, 2, 3]))
    with pytest.raises(ValueError, match="integers"):
        zero_shot_metrics(logits, labels.astype(float))
    with pytest.raises(ValueError, match="k=7 is more than the 6 classes"):
        zero_shot_metrics(logits, labels, ks=(1, 7))
    with pytest.raises(ValueError, match="non-empty"):
        zero_shot_metrics(np.zeros((0, 6)), np.zeros(0, int))
    with pytest.raises(ValueError, match="non-empty"):
        zero_shot_metrics(np.zeros(6), labels)
    with pytest.raises(ValueError, match="non-finite"):
        zero_shot_metrics(np.full((4, 6), np.nan), labels)
    with pytest.raises(ValueError, match="k must be >= 1"):
        zero_shot_metrics(logits, labels, ks=(0,))


# ------------------------------------------------------------------------------------- retrieval


def loop_retrieval(images: np.ndarray, texts: np.ndarray, text_to_image: np.ndarray, ks) -> dict[str, float]:
    """Plain Python: sort each query's candidates by (-score, index) and look for a positive in the first k."""
    scores = texts @ images.T
    out = {}
    for k in ks:
        t2i = [text_to_image[t] in sorted(range(len(images)), key=lambda i: (-scores[t, i], i))[:k]
               for t in range(len(texts))]
        i2t = [any(text_to_image[t] == i for t in sorted(range(len(texts)), key=lambda t: (-scores[t, i], t))[:k])
               for i in range(len(images))]
        out[f"i2t_r{k}"], out[f"t2i_r{k}"] = float(np.mean(i2t)), float(np.mean(t2i))
    return out


def clip_benchmark_retrieval(images: np.ndarray, texts: np.ndarray, text_to_image: np.ndarray, ks) -> dict[str, float]:
    """clip_benchmark's recipe in torch: top-k by torch.topk, a query is a hit if any positive is in its top k."""
    scores = torch.tensor(texts @ images.T)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(texts)), torch.tensor(text_to_image)] = True

    def hit_rate(s, pos, k):
        top = torch.topk(s, k, dim=1).indices
        return pos.gather(1, top).any(1).float().mean().item()

    out = {}
    for k in ks:
        out[f"t2i_r{k}"] = hit_rate(scores, positive, k)  # clip_benchmark's image_retrieval_recall@k
        out[f"i2t_r{k}"] = hit_rate(scores.T, positive.T, k)  # its text_retrieval_recall@k
    return out


def random_captioned(seed: int, n_img: int, dim: int):
    rng = np.random.default_rng(seed)
    images = unit(rng.standard_normal((n_img, dim)))
    captions = rng.integers(1, 6, n_img)  # 1-5 captions per image
    text_to_image = rng.permutation(np.repeat(np.arange(n_img), captions))
    texts = unit(images[text_to_image] + 1.2 * rng.standard_normal((len(text_to_image), dim)))
    return images, texts, text_to_image


@pytest.mark.parametrize("seed", range(3))
def test_retrieval_metrics_match_a_loop_and_clip_benchmark(seed):
    images, texts, text_to_image = random_captioned(seed, 40, 8)
    ks = (1, 5, 10)
    metrics = retrieval_metrics(images, texts, text_to_image, ks)
    assert set(metrics) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in ks}
    expected = loop_retrieval(images, texts, text_to_image, ks)
    assert metrics == pytest.approx(expected, abs=1e-12)
    assert metrics == pytest.approx(clip_benchmark_retrieval(images, texts, text_to_image, ks), abs=1e-6)
    assert 0.0 < metrics["t2i_r1"] < metrics["t2i_r10"] < 1.0  # neither trivial nor saturated
    assert metrics["i2t_r1"] != metrics["t2i_r1"]


def test_retrieval_ties_rank_the_lower_index_first():
    # Small integer embeddings give exact, repeated scores; a loop with the same tie rule must agree.
    rng = np.random.default_rng(5)
    images, texts, text_to_image = random_captioned(5, 30, 4)
    images, texts = rng.integers(-1, 2, images.shape).astype(float), rng.integers(-1, 2, texts.shape).astype(float)
    scores = texts @ images.T
    assert any(len(np.unique(row)) < len(row) for row in scores)
    ks = (1, 2, 5)
    assert retrieval_metrics(images, texts, text_to_image, ks) == pytest.approx(
        loop_retrieval(images, texts, text_to_image, ks), abs=1e-12)


def test_retrieval_errors():
    images, texts, text_to_image = random_captioned(0, 6, 4)
    with pytest.raises(ValueError, match="dim"):
        retrieval_metrics(images, texts[:, :3], text_to_image, (1,))
    with pytest.raises(ValueError, match="text_to_image must be"):
        retrieval_metrics(images, texts, text_to_image[:-1], (1,))
    with pytest.raises(ValueError, match="out of range"):
        retrieval_metrics(images[:-1], texts, text_to_image, (1,))
    with pytest.raises(ValueError, match="have no text"):
        retrieval_metrics(np.concatenate([images, images[:1]]), texts, text_to_image, (1,))
    with pytest.raises(ValueError, match="k=7 is more than the 6 images"):
        retrieval_metrics(images, texts, text_to_image, (1, 7))
    with pytest.raises(ValueError, match="non-empty"):
        retrieval_metrics(images[:0], texts, text_to_image, (1,))
    with pytest.raises(ValueError, match="ks is empty"):
        retrieval_metrics(images, texts, text_to_image, ())
