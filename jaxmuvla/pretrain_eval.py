"""What a µ-VLA pre-training learned, on its held-out images: each objective's loss and hit rate,
and the numbers the gates (`jaxmuvla.gates`) read.

    evaluate_pretraining(task, params) -> {"heldout_mrc": ..., "grounding_acc": ..., "itm_auc": ...}

Every pass runs at one compiled shape (`fixed_batch_indices`), without dropout, with masks drawn from
fixed seeds, so two checkpoints are compared on the same masks, queries and pairs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmuvla import gates, objectives
from jaxmuvla.corpus import CorpusBuildError
from jaxmuvla.losses import aligned_probability
from vlcore.fixed_batches import fixed_batch_indices

EVAL_MASKINGS = 4  # held-out losses are averaged over this many maskings of each batch (fixed seeds)
# bumped when a metric's definition changes: metrics saved by an older evaluation are measured again
# (2: the grounding probe reads a masked word from each region alone; p-MRTC's hit rate skips "a")
EVALUATION_VERSION = 2


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve: P(a positive scores above a negative), ties counting one half."""
    scores = np.concatenate([positive, negative])
    ranks = np.empty(len(scores))
    order = np.argsort(scores, kind="stable")
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def aligned_scorer(task):
    """A jitted (params, regions batch, sentence ids [b, L]) -> P(aligned) [b] of the ITM head."""
    module, tokens = task.module, task.tokens

    @jax.jit
    def aligned(params, batch, ids):  # params an argument, not constants baked into the program
        model = module.bind({"params": params})
        _, pooled = model.encode(ids, ids != tokens.pad, None, None, batch["region_features"], batch["region_boxes"],
                                 batch["region_class"] >= 0)
        return aligned_probability(model.itm_logits(pooled))

    return aligned


def evaluate_pretraining(task, params: Any, batch_size: int = 64) -> dict[str, float]:
    """Held-out images: each objective's loss and hit rate with masks fixed by seed, as means over
    the masked items; and the gates' numbers: the class prior's MRC cross-entropy, the grounding
    probe and its chance, the ITM AUC of (image, its top-1 retrieved sentence) against (image, a
    sentence retrieved for another held-out image), and, where the images have captions (the
    world), the ITM AUC of (image, its caption) against (image, its caption with one word swapped)."""
    module, s, tokens = task.module, task.settings, task.tokens
    full = dataclasses.replace(s, region_tag=True, region_phrase=True, image_sentence=True, curriculum_steps=-1,
                               mrc=True, mrfr=True, p_mrtc=True)  # every loss, whatever trained

    @jax.jit
    def losses(params, batch, key):
        model = module.bind({"params": params})
        k_rt, k_rn, k_is = jax.random.split(key, 3)
        sentences = objectives.select_sentences(batch, jnp.zeros((batch["region_class"].shape[0],), jnp.int32))
        rt = objectives.region_tag_loss(model, batch, k_rt, full, tokens)
        rn = objectives.region_phrase_loss(model, batch, sentences, k_rn, full, tokens)
        is_, _ = objectives.image_sentence_loss(model, batch, sentences, k_is, full, tokens)
        return {**rt, **rn, **is_}

    aligned = aligned_scorer(task)
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    positive, negative = [], []
    rows = task.eval_rows
    for index, real in fixed_batch_indices(len(rows), batch_size):
        batch = {k: jnp.asarray(v[np.arange(len(index))]) for k, v in task.arrays(rows[index]).items()}
        for repeat in range(EVAL_MASKINGS):  # several maskings: enough masked items for every objective
            parts = losses(params, batch, jax.random.key(int(index[0]) * EVAL_MASKINGS + repeat))
            for key, value in parts.items():
                if key.endswith("_items"):
                    continue
                items = np.asarray(parts[f"{key.removesuffix('_acc')}_items"])[:real]
                sums[key] = sums.get(key, 0.0) + float(np.sum(np.asarray(value)[:real] * items))
                counts[key] = counts.get(key, 0.0) + float(np.sum(items))
        top = batch["sentence_ids"][:, 0]
        positive.append(np.asarray(aligned(params, batch, top))[:real])
        negative.append(np.asarray(aligned(params, batch, jnp.roll(top, 1, axis=0)))[:real])
    out = {f"heldout_{k}": v / max(counts[k], 1.0) for k, v in sums.items()}
    out["itm_auc"] = auc(np.concatenate(positive), np.concatenate(negative))
    classes = task.corpus.arrays["region_class"]
    out["mrc_prior_ce"] = gates.class_prior_cross_entropy(classes[task.train_rows], classes[task.eval_rows],
                                                          len(task.corpus.class_names))
    out.update(grounding_probe(task, params, batch_size))
    captions = heldout_captions(task)
    if captions is not None:
        out.update(hard_pair_auc(task, params, captions, aligned, batch_size))
    return out


def class_word_ids(task) -> list[np.ndarray]:
    """Each class name's word pieces in the model's vocabulary."""
    pieces = task.pretrained.tokenizer(list(task.corpus.class_names), add_special_tokens=False)["input_ids"]
    return [task.ids(np.asarray(p, np.int64)) for p in pieces]


def word_from_region_scores(task, params: Any, features: np.ndarray, boxes: np.ndarray, region_class: np.ndarray,
                            batch_size: int = 64) -> np.ndarray:
    """The grounding probe's scores: for each image (features [n, R, D] scaled as the model reads
    them, boxes [n, R, 5], region_class [n, R], -1 = no region) and each of its regions alone (the
    others masked out of attention), with the sentence "[CLS] [MASK]… [SEP]" (one [MASK] per word
    piece of the class name), the mean log-probability of each class name's pieces at the masks
    -> [n, R, classes] (-inf on padding regions).

    This is phrase MLM's read-out (R-N masks a phrase and predicts its words from the regions): a
    model that grounded words in regions names a region's class from that region alone."""
    module, tokens = task.module, task.tokens
    n, regions = region_class.shape
    words = class_word_ids(task)
    longest = max(len(w) for w in words)
    scores = np.full((n, regions, len(words)), -np.inf, np.float32)
    pairs = np.argwhere(region_class >= 0)  # (image, region) items
    if len(pairs) == 0:
        return scores

    @jax.jit
    def masked_logp(params, ids, features, boxes, visible):  # -> [b, longest, V]
        model = module.bind({"params": params})
        ids = jnp.broadcast_to(ids, (features.shape[0], ids.shape[0]))
        hidden, _ = model.encode(ids, ids != tokens.pad, None, None, features, boxes, visible)
        return jax.nn.log_softmax(model.mlm_logits(hidden[:, 1:1 + longest]).astype(jnp.float32), -1)

    by_length: dict[int, list[int]] = {}
    for c, w in enumerate(words):
        by_length.setdefault(len(w), []).append(c)
    for length, classes in sorted(by_length.items()):
        ids = np.full(2 + longest, tokens.pad, np.int32)
        ids[:length + 2] = [tokens.cls, *[tokens.mask] * length, tokens.sep]
        for index, real in fixed_batch_indices(len(pairs), batch_size):
            image, region = pairs[index, 0], pairs[index, 1]
            visible = np.arange(regions)[None, :] == region[:, None]
            logp = np.asarray(masked_logp(params, jnp.asarray(ids), jnp.asarray(features[image]),
                                          jnp.asarray(boxes[image]), jnp.asarray(visible)))[:real]
            for c in classes:
                scores[image[:real], region[:real], c] = logp[:, np.arange(length), words[c]].mean(-1)
    return scores


def grounding_probe(task, params: Any, batch_size: int = 64) -> dict[str, float]:
    """The region-phrase gate: for each held-out (image, class present among >= 2 classes), a hit
    when the region whose word-from-region score (`word_from_region_scores`) for that class is
    highest is of that class. Returns grounding_acc, grounding_chance and grounding_queries."""
    region_class = np.asarray(task.corpus.arrays["region_class"][task.eval_rows])
    images, query_class, chance = gates.grounding_queries(region_class)
    if len(images) == 0:
        return {}
    probed = np.unique(images)
    a = task.arrays(task.eval_rows[probed])
    every = np.arange(len(probed))
    scores = word_from_region_scores(task, params, a["region_features"][every], a["region_boxes"][every],
                                     region_class[probed], batch_size)
    at = np.searchsorted(probed, images)
    hits = gates.grounding_hits(scores[at, :, query_class], region_class[images], query_class)
    return {"grounding_acc": float(hits.mean()), "grounding_chance": float(chance.mean()),
            "grounding_queries": float(len(images))}


def heldout_captions(task) -> list[str] | None:
    """The held-out images' own captions, where the corpus's images are the world's (whose examples keep
    theirs; µ-VLA never trains on them): the hard ITM pairs are built from them. None otherwise."""
    c = task.config.corpus
    if not c.images.startswith("world:"):
        return None
    import tensorflow_datasets as tfds

    from vlcore.world import builder as world

    _, config, split = c.images.split(":")
    first, last = int(task.eval_rows[0]), int(task.eval_rows[-1]) + 1
    ds = world.builder(c.data_dir or None, config).as_dataset(split=f"{split}[{first}:{last}]", shuffle_files=False)
    examples = [(str(int(e["image_id"])), e["caption"].decode()) for e in tfds.as_numpy(ds)]
    expected = [str(x) for x in task.corpus.arrays["image_id"][task.eval_rows]]
    if [i for i, _ in examples] != expected:
        raise CorpusBuildError(f"corpus {task.corpus.directory}: its held-out image ids are not the world split's "
                               f"{split}[{first}:{last}]: the corpus was built from other images")
    return [text for _, text in examples]


def hard_pair_auc(task, params: Any, captions: list[str], aligned, batch_size: int) -> dict[str, float]:
    """ITM AUC of (image, its caption) against (image, its caption with one class, colour or pattern
    word swapped for another: `gates.swap_one_word`), over the held-out images whose caption has one."""
    from vlcore.world.taxonomy import COARSE_NAMES, COARSE_PLURALS, COLOURS

    length = task.corpus.arrays["sentence_ids"].shape[-1]
    tokenizer = task.pretrained.tokenizer
    ids = task.ids(np.asarray(tokenizer(captions, truncation=True, max_length=length, padding="max_length",
                                        return_tensors="np")["input_ids"], np.int64))
    # one word per pattern (a synonym swapped in would leave the caption true)
    patterns = ("plain", "dotted", "checkered", "bordered")
    plurals = [p for p in COARSE_PLURALS if p not in COARSE_NAMES]  # "fish" is both
    unknown = int(task.ids(np.asarray([tokenizer.unk_token_id]))[0])  # a word outside the model's vocabulary
    groups = gates.single_piece_groups(tokenizer, task.ids, [COARSE_NAMES, plurals, COLOURS, patterns],
                                       exclude=(unknown,))
    swapped, ok = gates.swap_one_word(ids, groups, seed=0)
    if not ok.any():
        return {}
    a = task.arrays(task.eval_rows)
    positive, negative = [], []
    for index, real in fixed_batch_indices(len(captions), batch_size):
        batch = {k: jnp.asarray(a[k][index]) for k in ("region_features", "region_boxes", "region_class")}
        positive.append(np.asarray(aligned(params, batch, jnp.asarray(ids[index])))[:real])
        negative.append(np.asarray(aligned(params, batch, jnp.asarray(swapped[index])))[:real])
    positive, negative = np.concatenate(positive)[ok], np.concatenate(negative)[ok]
    return {"itm_auc_hard": auc(positive, negative), "itm_hard_pairs": float(ok.sum())}
