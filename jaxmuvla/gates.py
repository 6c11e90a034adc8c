"""Whether each granularity of a µ-VLA pre-training was learned: the gates read before any
downstream number.

A downstream gap between two pre-trainings means something only if the mechanism the paper
credits is in the checkpoint. Each gate is one held-out number against the value that says
"nothing learned" (computed by `jaxmuvla.pretrain_eval.evaluate_pretraining`):

  * region-tag (R-T):   MRC cross-entropy of masked regions against the class prior's (a model
                        that reads a masked region's class off its tag, which keeps the region's
                        box, falls far below the prior);
  * region-phrase:      the grounding probe: the region from which alone the model best predicts a
                        masked class word (phrase MLM's read-out) is one of that class, against the
                        chance of picking one;
  * image-sentence:     ITM AUC of an image's retrieved sentence against another image's, and on
                        hard pairs: the image's own caption against the same caption with one class,
                        colour or pattern word swapped (`swap_one_word`).

The pure functions here (`swap_one_word`, `grounding_queries`, `gate_report`) hold the rules;
the model passes are in `jaxmuvla.pretrain_eval`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

# (name, metric, baseline metric or constant, rule, what it says). A gate passes when the metric
# clears the bar computed from the baseline: "below_half" (metric <= baseline / 2), "halfway"
# (metric >= baseline + (1 - baseline) / 2: half the way from chance to perfect), "at_least".
GATES: tuple[tuple[str, str, str | float, str, str], ...] = (
    ("region_tag", "heldout_mrc", "mrc_prior_ce", "below_half", "MRC at most half the class prior's cross-entropy"),
    ("grounding", "grounding_acc", "grounding_chance", "halfway", "grounding probe halfway from chance to 1"),
    ("itm", "itm_auc", 0.75, "at_least", "ITM AUC, retrieved vs another image's sentence, >= 0.75"),
    ("itm_hard", "itm_auc_hard", 0.6, "at_least", "ITM AUC, own caption vs one word swapped, >= 0.6"),
)


def _bar(baseline: float, rule: str) -> float:
    if rule == "below_half":
        return baseline / 2
    if rule == "halfway":
        return baseline + (1 - baseline) / 2
    return baseline


def gate_report(metrics: dict[str, Any]) -> dict[str, Any]:
    """{"passed": all gates whose metrics are present passed, "gates": {name: {"metric", "value",
    "threshold", "passed", "rule"}}, "missing": [gate names whose metric was not measured]}.

    A gate whose metric is absent (e.g. hard pairs on a corpus without captions) is listed under
    "missing", not counted as passed or failed."""
    gates, missing = {}, []
    for name, metric, baseline, rule, text in GATES:
        base = metrics.get(baseline) if isinstance(baseline, str) else baseline
        if metric not in metrics or base is None:
            missing.append(name)
            continue
        value, bar = float(metrics[metric]), _bar(float(base), rule)
        passed = value <= bar if rule == "below_half" else value >= bar
        gates[name] = {"metric": metric, "value": value, "threshold": bar, "passed": bool(passed), "rule": text}
    return {"passed": bool(gates) and all(g["passed"] for g in gates.values()), "gates": gates, "missing": missing}


def failed_gates(metrics: dict[str, Any]) -> list[str]:
    """The names of the gates a pre-training's metrics fail (empty when every measured gate passed)."""
    return [name for name, g in gate_report(metrics)["gates"].items() if not g["passed"]]


def swap_one_word(ids: np.ndarray, groups: Sequence[Sequence[int]], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hard negatives: ids [n, L] -> (ids with one word swapped [n, L], swapped [n] bool).

    groups: word-piece ids that can stand for each other (class words, colours, patterns; one
    word piece each). In each row one position holding a grouped id is drawn (uniformly, from
    `seed`) and replaced by another id of its group, drawn uniformly; rows with none keep their ids.
    """
    ids = np.array(ids, copy=True)
    group_of = {int(t): g for g, members in enumerate(groups) for t in members}
    rng = np.random.default_rng(seed)
    swapped = np.zeros(len(ids), bool)
    for i, row in enumerate(ids):
        positions = [j for j, t in enumerate(row) if int(t) in group_of]
        if not positions:
            continue
        j = positions[int(rng.integers(len(positions)))]
        members = [t for t in groups[group_of[int(row[j])]] if t != int(row[j])]
        row[j] = members[int(rng.integers(len(members)))]
        swapped[i] = True
    return ids, swapped


def single_piece_groups(tokenizer, vocabulary_map, word_groups: Sequence[Sequence[str]],
                        exclude: Sequence[int] = ()) -> list[list[int]]:
    """Word groups -> the model's ids of the words that are one word piece (others cannot be swapped
    without changing the length), without the ids in `exclude` (the [UNK] a restricted vocabulary
    maps unseen words to: swapping in [UNK] is no hard negative); groups left with fewer than 2
    words are dropped."""
    out = []
    drop = {int(t) for t in exclude}
    for words in word_groups:
        pieces = tokenizer(list(words), add_special_tokens=False)["input_ids"]
        ids = sorted({int(vocabulary_map(np.asarray(p))[0]) for p in pieces if len(p) == 1} - drop)
        if len(ids) >= 2:
            out.append(ids)
    return out


def grounding_queries(region_class: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The grounding probe's queries: every (image, class) with the class among the image's regions,
    in images whose regions have at least two classes. region_class [n, R] (-1 = none) ->
    (image [q], class [q], chance [q]: the share of the image's regions of that class)."""
    images, classes, chance = [], [], []
    for i, row in enumerate(np.asarray(region_class)):
        real = row[row >= 0]
        present = np.unique(real)
        if len(present) < 2:
            continue
        for c in present:
            images.append(i)
            classes.append(int(c))
            chance.append(float(np.mean(real == c)))
    return np.asarray(images, np.int64), np.asarray(classes, np.int64), np.asarray(chance, np.float64)


def grounding_hits(region_scores: np.ndarray, region_class: np.ndarray, query_class: np.ndarray) -> np.ndarray:
    """region_scores [q, R] (-inf on padding), region_class [q, R], query_class [q] -> [q] bool: the
    best-scored region is of the queried class."""
    best = np.argmax(region_scores, axis=1)
    return np.take_along_axis(region_class, best[:, None], axis=1)[:, 0] == query_class


def class_prior_cross_entropy(train_classes: np.ndarray, heldout_classes: np.ndarray, num_classes: int) -> float:
    """The MRC loss of a model that knows only the class frequencies: the cross-entropy of the
    held-out regions' classes under the training regions' class prior (add-one smoothed)."""
    train = np.asarray(train_classes).ravel()
    counts = np.bincount(train[train >= 0], minlength=num_classes) + 1.0
    log_prior = np.log(counts / counts.sum())
    held = np.asarray(heldout_classes).ravel()
    held = held[held >= 0]
    return float(-log_prior[held].mean()) if len(held) else float("nan")
