"""µ-VLA's pre-training gates (`jaxmuvla.gates`): the rules, against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from jaxmuvla import gates


def test_swap_one_word_changes_exactly_one_grouped_word_to_another_of_its_group():
    groups = [[10, 11, 12], [20, 21]]
    ids = np.array([[1, 10, 5, 20, 2, 0],   # two swappable words
                    [1, 5, 6, 7, 2, 0],     # none
                    [1, 21, 21, 2, 0, 0]])  # a repeated word: one position changes
    out, swapped = gates.swap_one_word(ids, groups, seed=3)
    np.testing.assert_array_equal(swapped, [True, False, True])
    np.testing.assert_array_equal(out[1], ids[1])
    for i in (0, 2):
        changed = np.flatnonzero(out[i] != ids[i])
        assert len(changed) == 1
        j = changed[0]
        group = next(g for g in groups if ids[i, j] in g)
        assert out[i, j] in group and out[i, j] != ids[i, j]
    again, _ = gates.swap_one_word(ids, groups, seed=3)
    np.testing.assert_array_equal(again, out)  # a function of the seed
    # over many seeds every grouped position and every other member is drawn
    draws = {tuple(gates.swap_one_word(ids[:1], groups, seed=s)[0][0]) for s in range(200)}
    assert len(draws) == 2 + 1  # 10 -> 11 | 12, or 20 -> 21


def test_grounding_queries_and_hits():
    region_class = np.array([[0, 1, 1, -1],   # two classes: two queries
                             [2, 2, -1, -1],  # one class only: none
                             [3, 4, 5, 3]])   # three classes
    images, classes, chance = gates.grounding_queries(region_class)
    np.testing.assert_array_equal(images, [0, 0, 2, 2, 2])
    np.testing.assert_array_equal(classes, [0, 1, 3, 4, 5])
    np.testing.assert_allclose(chance, [1 / 3, 2 / 3, 2 / 4, 1 / 4, 1 / 4])
    scores = np.array([[0.1, 0.9, 0.2, -np.inf], [0.1, 0.9, 0.2, -np.inf], [0.0, 0.0, 0.0, 5.0],
                       [1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    hits = gates.grounding_hits(scores, region_class[images], classes)
    np.testing.assert_array_equal(hits, [False, True, True, False, False])


def test_class_prior_cross_entropy_is_the_smoothed_prior_on_the_heldout_classes():
    train = np.array([[0, 0, 1, -1], [0, 2, -1, -1]])  # counts 3, 1, 1 (+1 each): 4/8, 2/8, 2/8
    held = np.array([[0, 1, -1], [2, -1, -1]])
    expected = -(np.log(4 / 8) + np.log(2 / 8) + np.log(2 / 8)) / 3
    assert gates.class_prior_cross_entropy(train, held, 3) == pytest.approx(expected)


def test_gate_report():
    good = {"heldout_mrc": 0.4, "mrc_prior_ce": 1.7, "grounding_acc": 0.9, "grounding_chance": 0.5,
            "itm_auc": 0.8, "itm_auc_hard": 0.7}
    report = gates.gate_report(good)
    assert report["passed"] and not report["missing"] and set(report["gates"]) == {g[0] for g in gates.GATES}
    assert report["gates"]["region_tag"]["threshold"] == pytest.approx(0.85)
    assert report["gates"]["grounding"]["threshold"] == pytest.approx(0.75)
    # MRC at the class prior (regions never read their tags) and grounding at chance fail
    bad = {**good, "heldout_mrc": 1.68, "grounding_acc": 0.55}
    assert gates.failed_gates(bad) == ["region_tag", "grounding"] and not gates.gate_report(bad)["passed"]
    # a gate not measured (no captions: no hard pairs) is named, neither passed nor failed
    partial = {k: v for k, v in good.items() if k != "itm_auc_hard"}
    report = gates.gate_report(partial)
    assert report["missing"] == ["itm_hard"] and report["passed"]
    assert not gates.gate_report({})["passed"]


def test_single_piece_groups_keep_one_piece_words_in_the_vocabulary():
    """Multi-piece words cannot be swapped without changing the length; a word the restricted
    vocabulary maps to [UNK] is no hard negative (the caption would only lose a word)."""
    pieces = {"cat": [7], "dog": [8], "zebra": [9], "hippo": [10, 11], "red": [12], "mauve": [13]}

    def tokenizer(words, add_special_tokens):
        assert not add_special_tokens
        return {"input_ids": [pieces[w] for w in words]}

    unknown = 1
    known = {7: 107, 8: 108, 12: 112}  # zebra, hippo and mauve are outside the model's vocabulary
    vocabulary_map = lambda ids: np.asarray([known.get(int(i), unknown) for i in ids])  # noqa: E731
    word_groups = [["cat", "dog", "zebra", "hippo"], ["red", "mauve"]]
    assert gates.single_piece_groups(tokenizer, vocabulary_map, word_groups) == [[unknown, 107, 108],
                                                                               [unknown, 112]]
    # without [UNK] the colours are one word: the group is dropped
    assert gates.single_piece_groups(tokenizer, vocabulary_map, word_groups, exclude=(unknown,)) == [[107, 108]]


def test_auc_is_the_share_of_positive_negative_pairs_ranked_right():
    from jaxmuvla.pretrain_eval import auc

    rng = np.random.default_rng(1)
    positive, negative = rng.integers(0, 5, 40).astype(float), rng.integers(0, 4, 30).astype(float)  # many ties
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p in positive for n in negative]
    assert auc(positive, negative) == pytest.approx(np.mean(pairs))
