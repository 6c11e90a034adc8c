"""jaxmuvla.evaluate_all's pure parts: the seeds-and-examples bootstrap against the exact
distribution of its resampling (enumerated on a tiny case), the learning-rate choice, and the
table's marks (failed gates, uninformative tasks). Fast: no model, no world."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from jaxmuvla import evaluate_all as E


def exact_replicates(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Every equally likely outcome of the resampling: seeds of a, seeds of b, and examples, each
    drawn with replacement (ordered draws), the examples shared by a and b."""
    sa, sb, n = len(a), len(b), a.shape[1]
    out = []
    for da in itertools.product(range(sa), repeat=sa):
        for db in itertools.product(range(sb), repeat=sb):
            for ex in itertools.product(range(n), repeat=n):
                ex = list(ex)
                out.append(a[list(da)][:, ex].mean() - b[list(db)][:, ex].mean())
    return np.asarray(out)


def test_bootstrap_over_seeds_and_examples_matches_the_enumerated_resampling():
    a = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])  # 2 seeds x 3 examples
    b = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    exact = exact_replicates(a, b)  # 4 * 4 * 27 outcomes
    reps = E.bootstrap_replicates(a, b, resamples=200_000, seed=3)
    assert reps.mean() == pytest.approx(exact.mean(), abs=3 * exact.std() / np.sqrt(len(reps)))
    assert reps.var() == pytest.approx(exact.var(), rel=0.02)
    # the interval: between the exact distribution's quantiles just inside and outside 2.5 % / 97.5 %
    d = E.seed_example_interval(a, b, resamples=200_000, seed=3)
    assert d.difference == pytest.approx(a.mean() - b.mean())
    assert np.quantile(exact, 0.02, method="inverted_cdf") <= d.ci_low <= np.quantile(exact, 0.03, method="inverted_cdf")
    assert np.quantile(exact, 0.97, method="inverted_cdf") <= d.ci_high <= np.quantile(exact, 0.98, method="inverted_cdf")
    assert d.standard_error == pytest.approx(exact.std(), rel=0.02)


def test_bootstrap_with_one_seed_each_is_the_paired_example_bootstrap():
    """One seed per variant: nothing to resample but the examples; the replicates' variance is then
    the paired mean difference's, var(a - b) / n (ddof 0)."""
    rng = np.random.default_rng(0)
    a, b = rng.random((1, 400)), rng.random((1, 400))
    reps = E.bootstrap_replicates(a, b, resamples=40_000, seed=1)
    assert reps.var() == pytest.approx((a - b).var() / 400, rel=0.03)
    with pytest.raises(ValueError, match="same n"):
        E.bootstrap_replicates(a, b[:, :10])


def test_choose_lr_takes_the_best_val_score_and_the_earlier_grid_value_on_ties():
    grid = [1e-4, 5e-5, 2e-4]
    assert E.choose_lr({1e-4: 0.6, 5e-5: 0.7, 2e-4: 0.65}, grid) == 5e-5
    assert E.choose_lr({1e-4: 0.7, 5e-5: 0.7, 2e-4: 0.7}, grid) == 1e-4
    assert E.choose_lr({1e-4: 0.5, 5e-5: 0.7, 2e-4: 0.7}, grid) == 5e-5


def test_table_marks_failed_gates_and_uninformative_tasks(tmp_path):
    rows = [{"variant": v, "task": "ve", "seed": s, "lr": 1e-4, "test_accuracy": acc}
            for v, acc in (("no_pretraining", 0.6), ("aligned", 0.62), ("muvla", 0.61)) for s in (0, 1)]
    comps = [{"a": "aligned", "b": "no_pretraining", "task": "ve", "split": "test", "difference": 0.02,
              "ci_low": -0.01, "ci_high": 0.05, "excludes_zero": False, "seeds_a": [0, 1], "seeds_b": [0, 1],
              "per_seed_a": [0.62, 0.62], "per_seed_b": [0.6, 0.6]}]
    failed = {"passed": False, "missing": [], "gates": {
        "region_tag": {"value": 1.0, "threshold": 0.5, "passed": False},
        "itm": {"value": 0.9, "threshold": 0.75, "passed": True}}}
    passed = {"passed": True, "missing": [], "gates": {"itm": {"value": 0.9, "threshold": 0.75, "passed": True}}}
    table = E.markdown(rows, comps, ["ve"], ["no_pretraining", "aligned", "muvla"],
                       {"no_pretraining": None, "aligned": passed, "muvla": failed})
    assert "| muvla | (gates failed: region_tag) |" in table
    assert "| aligned | passed |" in table and "| no_pretraining | n/a (not pre-trained) |" in table
    assert "- VE: uninformative at this scale" in table
    comps[0].update(ci_low=0.01, excludes_zero=True)
    assert E.informativeness(comps, ["ve", "nlvr2"]) == {
        "ve/test": "informative", "nlvr2/test": "not checked (needs aligned and no_pretraining)"}
