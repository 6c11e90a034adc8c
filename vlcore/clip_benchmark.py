"""Zero-shot classification and image<->text retrieval metrics, as LAION's clip_benchmark defines them.

The one implementation of these metrics: the world's two-tower model, RECO and its baselines are
all scored here. Host-side numpy. Rankings are a stable descending sort: among equal scores the lower index ranks
first (what np.argmax and torch.argmax pick); clip_benchmark's torch.topk leaves ties unspecified.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_CHUNK = 1024  # query rows scored at a time: bounds the [rows, candidates] buffers


def flatten_prompts(prompts: Sequence[Sequence[str]]) -> tuple[list[str], list[int]]:
    """Prompts [class][template] -> (every prompt in class order, the number of prompts per class)."""
    counts = [len(p) for p in prompts]
    if not counts or min(counts) < 1:
        raise ValueError("every class needs at least one prompt")
    return [p for per_class in prompts for p in per_class], counts


def class_embeddings(prompt_embeddings: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """CLIP's prompt ensembling: the mean of each class's prompt embeddings, renormalised.

    prompt_embeddings [sum(counts), dim] in class order -> [len(counts), dim], unit norm.
    """
    prompt_embeddings = np.asarray(prompt_embeddings, np.float32)
    if len(prompt_embeddings) != sum(counts) or min(counts, default=0) < 1:
        raise ValueError(f"class_embeddings: {len(prompt_embeddings)} prompt embeddings for class counts {list(counts)}")
    means = np.stack([chunk.mean(0) for chunk in np.split(prompt_embeddings, np.cumsum(counts)[:-1])])
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def _check_ks(ks: Sequence[int], limit: int, what: str) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks:
        raise ValueError("ks is empty")
    for k in ks:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if k > limit:
            raise ValueError(f"k={k} is more than the {limit} {what} to rank")
    return ks


def _check_labels(labels: np.ndarray, n: int, upper: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{what} must be [{n}], got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= upper):
        raise ValueError(f"{what} out of range [0, {upper}): min {labels.min()}, max {labels.max()}")
    return labels.astype(np.int64)


def _check_scores(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty 2-d array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} has non-finite values")
    return x


def rank_of(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Rank (0 = first) of column positive[i] in row i of scores [n, m] under a stable descending sort."""
    rows = np.arange(len(scores))
    target = scores[rows, positive][:, None]
    ahead = (scores > target) | ((scores == target) & (np.arange(scores.shape[1]) < positive[:, None]))
    return ahead.sum(1)


def zero_shot_metrics(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Single-label zero-shot classification of logits [n, classes] with labels [n].

    acc{k}: fraction of examples whose label is among the k highest logits (clip_benchmark's
    `accuracy`). mean_per_class_recall: the recall of the top-1 predictions averaged over the classes
    present in labels, i.e. sklearn's `balanced_accuracy_score(labels, argmax)` as clip_benchmark
    computes it. k > classes raises (clip_benchmark reports acc5 as NaN below 5 classes: pass ks=(1,)).
    """
    logits = _check_scores(logits, "logits")
    n, classes = logits.shape
    labels = _check_labels(labels, n, classes, "labels")
    ks = _check_ks(ks, classes, "classes")
    # Rank of the label's logit; top-k hit iff rank < k, top-1 prediction correct iff rank == 0.
    rank = np.concatenate([rank_of(logits[i:i + _CHUNK], labels[i:i + _CHUNK]) for i in range(0, n, _CHUNK)])
    metrics = {f"acc{k}": float(np.mean(rank < k)) for k in ks}
    per_class = np.bincount(labels, minlength=classes)
    correct = np.bincount(labels[rank == 0], minlength=classes)
    present = per_class > 0
    metrics["mean_per_class_recall"] = float(np.mean(correct[present] / per_class[present]))
    return metrics


def retrieval_metrics(
    image_embeds: np.ndarray, text_embeds: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k of image->text and text->image retrieval, scored by dot product (pass unit-norm embeddings).

    image_embeds [n_img, d], text_embeds [n_txt, d], text_to_image [n_txt]: the image of each text;
    every image needs at least one text. t2i_r{k}: fraction of texts whose image is among their k best
    images (clip_benchmark's image_retrieval_recall@k). i2t_r{k}: fraction of images with at least one
    of their texts among their k best texts (clip_benchmark's text_retrieval_recall@k).
    """
    image_embeds = _check_scores(image_embeds, "image_embeds")
    text_embeds = _check_scores(text_embeds, "text_embeds")
    if image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(f"image_embeds dim {image_embeds.shape[1]} != text_embeds dim {text_embeds.shape[1]}")
    n_img, n_txt = len(image_embeds), len(text_embeds)
    text_to_image = _check_labels(text_to_image, n_txt, n_img, "text_to_image")
    captions = np.bincount(text_to_image, minlength=n_img)
    if captions.min() == 0:
        raise ValueError(f"{int(np.sum(captions == 0))} images have no text, e.g. image {int(np.argmin(captions))}")
    ks = _check_ks(ks, n_img, "images")  # n_txt >= n_img: every image has a text

    t2i_rank = np.concatenate([rank_of(text_embeds[i:i + _CHUNK] @ image_embeds.T, text_to_image[i:i + _CHUNK])
                               for i in range(0, n_txt, _CHUNK)])
    i2t_rank = []
    for i in range(0, n_img, _CHUNK):
        scores = image_embeds[i:i + _CHUNK] @ text_embeds.T
        # An image's best-ranked text is its highest-scoring one (lowest index among equals).
        positive = text_to_image[None, :] == np.arange(i, i + len(scores))[:, None]
        best_text = np.argmax(np.where(positive, scores, -np.inf), axis=1)
        i2t_rank.append(rank_of(scores, best_text))
    i2t_rank = np.concatenate(i2t_rank)

    metrics = {f"i2t_r{k}": float(np.mean(i2t_rank < k)) for k in ks}
    metrics.update({f"t2i_r{k}": float(np.mean(t2i_rank < k)) for k in ks})
    return metrics


def class_match_recall(queries: np.ndarray, candidates: np.ndarray, query_labels: np.ndarray,
                       candidate_labels: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """{k: fraction of queries with a candidate of their own label among their k best} (dot product).

    The Recall@k of deep metric learning on CUB-200 and Cars196, where a hit is any result of the
    query's class. queries [n_q, d], candidates [n_c, d], labels [n_q] and [n_c] (integers).
    Every query's label must occur among the candidates.
    """
    queries = _check_scores(queries, "queries")
    candidates = _check_scores(candidates, "candidates")
    if queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"queries dim {queries.shape[1]} != candidates dim {candidates.shape[1]}")
    query_labels, candidate_labels = np.asarray(query_labels), np.asarray(candidate_labels)
    if query_labels.shape != (len(queries),) or candidate_labels.shape != (len(candidates),):
        raise ValueError(f"labels must be [{len(queries)}] and [{len(candidates)}], got {query_labels.shape} "
                         f"and {candidate_labels.shape}")
    absent = np.setdiff1d(query_labels, candidate_labels)
    if absent.size:
        raise ValueError(f"query labels {absent[:5].tolist()} have no candidate of their class")
    ks = _check_ks(ks, len(candidates), "candidates")
    ranks = []
    for i in range(0, len(queries), _CHUNK):
        scores = queries[i:i + _CHUNK] @ candidates.T
        positive = candidate_labels[None, :] == query_labels[i:i + _CHUNK, None]
        best = np.argmax(np.where(positive, scores, -np.inf), axis=1)  # best-ranked same-class candidate
        ranks.append(rank_of(scores, best))
    rank = np.concatenate(ranks)
    return {k: float(np.mean(rank < k)) for k in ks}


def class_match_retrieval_metrics(image_embeds: np.ndarray, text_embeds: np.ndarray, image_labels: np.ndarray,
                                  text_labels: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """i2t_r{k} and t2i_r{k} where a hit is a result of the query's class (`class_match_recall`)."""
    i2t = class_match_recall(image_embeds, text_embeds, image_labels, text_labels, ks)
    t2i = class_match_recall(text_embeds, image_embeds, text_labels, image_labels, ks)
    return {**{f"i2t_r{k}": v for k, v in i2t.items()}, **{f"t2i_r{k}": v for k, v in t2i.items()}}
