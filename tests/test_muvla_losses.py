"""µ-VLA's masking and losses against numpy: the same uniforms give the same masks, the rates hold
within sampling error, phrase masking follows the match cosine and never touches both modalities
of one example, and each loss equals its numpy formula per example."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmuvla import losses as L
from jaxmuvla import masking as M

MASK_ID, VOCAB = 103, 500


def numpy_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------------------- masking


def test_bert_mask_equals_numpy_and_keeps_the_rates():
    rng = np.random.default_rng(0)
    b, length = 4000, 20
    ids = rng.integers(1000, 2000, (b, length))
    maskable = np.ones((b, length), bool)
    maskable[:, 0] = maskable[:, -1] = False
    u_select, u_action = rng.random((b, length)), rng.random((b, length))
    random_ids = rng.integers(0, VOCAB, (b, length))
    got = M.bert_mask(jnp.asarray(ids), jnp.asarray(maskable), jnp.asarray(u_select), jnp.asarray(u_action),
                      jnp.asarray(random_ids), MASK_ID)
    masked = maskable & (u_select < 0.15)
    expected = ids.copy()
    for i, j in zip(*np.nonzero(masked)):
        expected[i, j] = MASK_ID if u_action[i, j] < 0.8 else (random_ids[i, j] if u_action[i, j] < 0.9 else ids[i, j])
    np.testing.assert_array_equal(np.asarray(got.masked), masked)
    np.testing.assert_array_equal(np.asarray(got.input_ids), expected)
    n = maskable.sum()
    rate = masked.sum() / n
    assert abs(rate - 0.15) < 4 * np.sqrt(0.15 * 0.85 / n)  # within sampling error
    action = u_action[masked]
    for low, high, share in ((0, 0.8, 0.8), (0.8, 0.9, 0.1), (0.9, 1.0, 0.1)):
        observed = np.mean((action >= low) & (action < high))
        assert abs(observed - share) < 4 * np.sqrt(share * (1 - share) / len(action))
    assert not np.asarray(got.masked)[:, [0, -1]].any()  # [CLS] and [SEP] are never masked


def numpy_phrase_mask(ids, spans, region_phrase, region_cos, u_mod, u_phrase, u_region, rate=0.15):
    b, length = ids.shape
    token = np.zeros((b, length), bool)
    region = np.zeros(region_phrase.shape, bool)
    for i in range(b):
        if u_mod[i] < 0.5:
            for p, (s, e) in enumerate(spans[i]):
                cos = [c for r, c in zip(region_phrase[i], region_cos[i]) if r == p]
                if s >= 0 and cos and u_phrase[i, p] < rate * min(max(max(cos), 0), 1):
                    token[i, s:e] = True
        else:
            region[i] = (region_phrase[i] >= 0) & (u_region[i] < rate * np.clip(region_cos[i], 0, 1))
    return token, region


def random_phrase_batch(rng, b, length=16, phrases=3, regions=4):
    ids = rng.integers(1000, 2000, (b, length))
    spans = np.full((b, phrases, 2), -1)
    for i in range(b):
        cuts = np.sort(rng.choice(np.arange(1, length - 1), 2 * phrases, replace=False)).reshape(phrases, 2)
        keep = rng.random(phrases) < 0.8
        spans[i][keep] = cuts[keep]
    region_phrase = np.where(rng.random((b, regions)) < 0.8, rng.integers(0, phrases, (b, regions)), -1)
    region_phrase = np.where((region_phrase >= 0) & (np.take_along_axis(spans[..., 0], np.maximum(region_phrase, 0),
                                                                        1) >= 0), region_phrase, -1)
    region_cos = np.where(region_phrase >= 0, rng.choice([0.2, 0.6, 1.0], (b, regions)), 0.0)
    return ids, spans, region_phrase, region_cos


def test_phrase_mask_equals_numpy_follows_the_cosine_and_masks_one_modality():
    rng = np.random.default_rng(1)
    b = 30000
    ids, spans, region_phrase, region_cos = random_phrase_batch(rng, b)
    u_mod, u_phrase, u_region = rng.random(b), rng.random((b, 3)), rng.random((b, 4))
    got = M.phrase_mask(*(jnp.asarray(x) for x in (ids, spans, region_phrase, region_cos, u_mod, u_phrase,
                                                    u_region)), MASK_ID)
    token, region = numpy_phrase_mask(ids, spans, region_phrase, region_cos, u_mod, u_phrase, u_region)
    np.testing.assert_array_equal(np.asarray(got.token_masked), token)
    np.testing.assert_array_equal(np.asarray(got.region_masked), region)
    np.testing.assert_array_equal(np.asarray(got.input_ids), np.where(token, MASK_ID, ids))
    np.testing.assert_array_equal(np.asarray(got.region_target_phrase), np.where(region, region_phrase, -1))
    # never both modalities in one example
    assert not (token.any(1) & region.any(1)).any()
    # a region is masked with probability 1/2 (its modality) x 0.15 x its cosine
    for cos in (0.2, 0.6, 1.0):
        at = region_phrase >= 0
        at &= region_cos == cos
        observed, expected = region[at].mean(), 0.5 * 0.15 * cos
        assert abs(observed - expected) < 4 * np.sqrt(expected * (1 - expected) / at.sum()), (cos, observed)
    # unmatched phrases and regions are never masked
    assert not region[region_phrase < 0].any()


def test_region_mask_rate():
    rng = np.random.default_rng(2)
    valid = rng.random((5000, 10)) < 0.7
    masked = np.asarray(M.region_mask(jnp.asarray(valid), jnp.asarray(rng.random((5000, 10)))))
    assert not masked[~valid].any()
    rate = masked[valid].mean()
    assert abs(rate - 0.15) < 4 * np.sqrt(0.15 * 0.85 / valid.sum())


# ------------------------------------------------------------------------------------------ losses


def test_masked_tokens_gathers_the_first_positions_in_order():
    mask = np.array([[0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    positions, valid = (np.asarray(x) for x in L.masked_tokens(jnp.asarray(mask), 3))
    np.testing.assert_array_equal(valid, [[1, 1, 1], [0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(positions[0], [1, 3, 4])
    np.testing.assert_array_equal(positions[2], [0, 1, 2])


def test_token_and_region_class_losses_equal_numpy_per_example():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((5, 4, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (5, 4))
    valid = rng.random((5, 4)) < 0.6
    valid[2] = False  # an example without masked items contributes 0
    got = np.asarray(L.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(valid)))
    ce = -np.take_along_axis(numpy_log_softmax(logits), targets[..., None], -1)[..., 0]
    expected = [ce[i][valid[i]].mean() if valid[i].any() else 0.0 for i in range(5)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    classes = np.where(rng.random((5, 4)) < 0.8, targets, -1)
    got = np.asarray(L.region_class_loss(jnp.asarray(logits), jnp.asarray(classes), jnp.asarray(valid)))
    ok = valid & (classes >= 0)
    expected = [ce[i][ok[i]].mean() if ok[i].any() else 0.0 for i in range(5)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["smooth_l1", "l2"])
def test_region_feature_loss_equals_numpy(kind):
    rng = np.random.default_rng(4)
    predicted, original = rng.standard_normal((2, 3, 5, 8)) * 1.5
    masked = rng.random((3, 5)) < 0.5
    got = np.asarray(L.region_feature_loss(jnp.asarray(predicted), jnp.asarray(original), jnp.asarray(masked), kind))
    d = predicted - original
    per = (np.where(np.abs(d) < 1, 0.5 * d ** 2, np.abs(d) - 0.5) if kind == "smooth_l1" else d ** 2).mean(-1)
    expected = [per[i][masked[i]].mean() if masked[i].any() else 0.0 for i in range(3)]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_phrase_word_loss_equals_numpy():
    rng = np.random.default_rng(5)
    b, m, length, vocab = 3, 2, 7, 13
    logits = rng.standard_normal((b, m, vocab)).astype(np.float32)
    ids = rng.integers(0, vocab, (b, length))
    positions = rng.random((b, m, length)) < 0.4
    valid = np.array([[1, 1], [1, 0], [0, 0]], bool)
    got = np.asarray(L.phrase_word_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(positions),
                                        jnp.asarray(valid)))
    logp = numpy_log_softmax(logits)
    expected = []
    for i in range(b):
        per = [np.mean([-logp[i, j, ids[i, t]] for t in np.flatnonzero(positions[i, j])])
               for j in range(m) if valid[i, j] and positions[i, j].any()]
        expected.append(np.mean(per) if per else 0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_itm_loss_and_probability():
    logits = np.array([[2.0, -1.0], [0.0, 3.0], [1.0, 1.0]], np.float32)
    aligned = np.array([True, False, True])
    p0 = np.exp(numpy_log_softmax(logits))[:, 0]
    np.testing.assert_allclose(np.asarray(L.aligned_probability(jnp.asarray(logits))), p0, rtol=1e-6)
    expected = -np.log(np.where(aligned, p0, 1 - p0))
    np.testing.assert_allclose(np.asarray(L.itm_loss(jnp.asarray(logits), jnp.asarray(aligned))), expected,
                               rtol=1e-5)


def test_item_mean_averages_over_masked_items_and_weights_each_example():
    """A batch's loss is the mean over its masked items, not over examples: an example with nothing
    masked must not count as a zero (the diluted mean), and the curriculum weights each example's
    items, not a batch mean (the public code's bug): both alternatives differ here and must fail."""
    values = np.array([1.0, 2.0, 0.0, 4.0])  # per-example means over their items
    counts = np.array([3.0, 1.0, 0.0, 2.0])  # example 2 has nothing masked
    w = np.array([0.9, 0.1, 0.5, 0.2])
    items = np.concatenate([np.full(int(c), v) for v, c in zip(values, counts)])
    item_weights = np.concatenate([np.full(int(c), x) for x, c in zip(w, counts)])
    got = float(L.item_mean(jnp.asarray(values), jnp.asarray(counts)))
    assert got == pytest.approx(items.mean())
    assert abs(got - values.mean()) > 0.1  # the mean over examples (zeros counted) differs
    weighted = float(L.item_mean(jnp.asarray(values), jnp.asarray(counts), jnp.asarray(w)))
    assert weighted == pytest.approx((item_weights * items).sum() / counts.sum())
    assert abs(weighted - w.mean() * items.mean()) > 0.1  # weighting a batch mean differs
    assert float(L.item_mean(jnp.zeros(3), jnp.zeros(3))) == 0.0  # nothing masked: 0, not nan
    # no gradient flows into the weights
    grad = jax.grad(lambda w_: L.item_mean(jnp.asarray(values), jnp.asarray(counts), w_))(jnp.asarray(w))
    assert not np.asarray(grad).any()


def test_accuracies_equal_numpy():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((4, 3, 9)).astype(np.float32)
    targets = rng.integers(0, 9, (4, 3))
    targets[0] = logits[0].argmax(-1)  # one example all right
    valid = rng.random((4, 3)) < 0.7
    valid[0], valid[3] = True, False
    got = np.asarray(L.token_accuracy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(valid)))
    hit = logits.argmax(-1) == targets
    expected = [hit[i][valid[i]].mean() if valid[i].any() else 0.0 for i in range(4)]
    np.testing.assert_allclose(got, expected)
    assert got[0] == 1.0
    # p-MRTC: a hit when the argmax word piece is any word piece of the region's phrase
    ids = rng.integers(0, 9, (4, 5))
    positions = rng.random((4, 3, 5)) < 0.5
    got = np.asarray(L.phrase_word_accuracy(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(positions),
                                            jnp.asarray(valid)))
    top = logits.argmax(-1)
    expected = []
    for i in range(4):
        per = [top[i, j] in set(ids[i][positions[i, j]].tolist()) for j in range(3)
               if valid[i, j] and positions[i, j].any()]
        expected.append(np.mean(per) if per else 0.0)
    np.testing.assert_allclose(got, expected)


def test_p_mrtc_hit_rate_does_not_count_function_words():
    """Predicting "a" (id 5), in every phrase, for every masked region is no grounding: with 5
    ignored it is a miss; the content word (id 7) is a hit; a phrase of ignored words only counts
    as a miss, not as absent."""
    ids = jnp.asarray([[1, 5, 7, 2, 5, 2]])  # [CLS] a dog [SEP] a [SEP]
    phrases = jnp.asarray([[[0, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0]]], bool)  # "a dog" x2, "a"
    logits = jax.nn.one_hot(jnp.asarray([[5, 7, 5]]), 9)  # region 0 says "a", region 1 "dog", region 2 "a"
    valid = jnp.ones((1, 3), bool)
    assert float(L.phrase_word_accuracy(logits, ids, phrases, valid)[0]) == 1.0  # every word counted
    assert float(L.phrase_word_accuracy(logits, ids, phrases, valid, ignore=(5,))[0]) == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------- the I-S objective


def test_image_sentence_masks_every_pair_alike_and_predicts_words_of_aligned_pairs_only():
    """I-S must not leak its ITM label through the masking: aligned and unaligned pairs get
    [MASK] tokens at the same rate (if only aligned ones were masked, "has a [MASK]" would answer
    ITM), while the sentence MLM loss counts only the aligned pairs' masked words."""
    from jaxmuvla import objectives as O

    b, length, regions, hidden = 512, 16, 3, 8
    rng = np.random.default_rng(0)
    ids = rng.integers(200, VOCAB, (b, length))  # no special ids among the words
    ids[:, 0], ids[:, -1] = 101, 102
    seen = {}

    class Model:  # records what the encoder receives; the heads see constant hidden states
        def encode(self, input_ids, attention_mask, token_boxes, token_box_mask, features, boxes, region_mask):
            seen["input_ids"] = input_ids
            return jnp.zeros((b, length + regions, hidden)), jnp.zeros((b, hidden))

        mlm_logits = staticmethod(lambda h: jnp.zeros((*h.shape[:-1], VOCAB)))
        itm_logits = staticmethod(lambda p: jnp.zeros((p.shape[0], 2)))

    batch = {"region_features": jnp.zeros((b, regions, 4)), "region_boxes": jnp.zeros((b, regions, 5)),
             "region_class": jnp.zeros((b, regions), jnp.int32)}
    key = jax.random.key(5)
    parts, returned = O.image_sentence_loss(Model(), batch, {"sentence_ids": jnp.asarray(ids)}, key,
                                            O.ObjectiveSettings(), O.Tokens(vocab_size=VOCAB))
    aligned = np.asarray(jax.random.uniform(jax.random.split(key, 4)[0], (b,)) >= 0.5)  # the objective's draw
    np.testing.assert_array_equal(np.asarray(returned), aligned)
    assert 0.4 < aligned.mean() < 0.6
    np.testing.assert_allclose(np.asarray(parts["itm"]), np.log(2.0), rtol=1e-6)  # zero logits: CE = log 2, every pair
    masked_share = (np.asarray(seen["input_ids"]) == 103).mean(1)
    rate = lambda group: masked_share[group].mean()  # noqa: E731  ~0.15 x 0.8 x 14/16 in both groups
    assert abs(rate(aligned) - rate(~aligned)) < 0.02 and rate(~aligned) > 0.07
    # zero logits: every predicted word costs log(VOCAB); unaligned pairs predict none
    has = np.asarray(parts["sentence_mlm_items"]) > 0
    assert not has[~aligned].any() and has[aligned].mean() > 0.8
    np.testing.assert_allclose(np.asarray(parts["sentence_mlm"])[has], np.log(VOCAB), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(parts["sentence_mlm"])[~has], 0.0)
