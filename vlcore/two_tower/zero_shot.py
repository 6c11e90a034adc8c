"""Zero-shot classification with a two-tower model: class prompts against image embeddings."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def class_embeddings(prompts: Sequence[Sequence[str]], encode: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """Mean of each class's prompt-template embeddings, renormalised (as CLIP does): [classes, dim]."""
    flat = [p for class_prompts in prompts for p in class_prompts]
    counts = [len(p) for p in prompts]
    if min(counts, default=0) < 1:
        raise ValueError("every class needs at least one prompt")
    embeds = encode(flat)
    means = np.stack([chunk.mean(0) for chunk in np.split(embeds, np.cumsum(counts)[:-1])])
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores. scores [n, classes]."""
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def zero_shot_accuracy(image_embeds: np.ndarray, class_embeds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    scores = image_embeds @ class_embeds.T
    return {"acc1": top_k_accuracy(scores, labels, 1), "acc5": top_k_accuracy(scores, labels, 5)}
