"""RECO's evaluations: zero-shot classification and image-text retrieval, each side refinable.

A `Refiner` turns (frozen query embeddings [n, d], retrieved payload embeddings [n, k, d]) into
refined embeddings, per modality: the trained fusion, the untrained mean of the neighbours, or
nothing (the frozen baseline: the same code path with no retrieval at all). Which sides are
refined is a switch per evaluation (the paper refines both for classification, and found that
refining the text side can hallucinate in text->image retrieval).

Zero-shot classification follows CLIP: every class prompt is embedded (and refined) on its own,
the prompts of a class are averaged and re-normalised; metrics are LAION clip_benchmark's
(acc@1, acc@5, mean per-class recall).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from jaxreco.data import Artefacts, Memory, SplitSpec
from jaxreco.metrics import retrieval_metrics, zero_shot_metrics
from jaxreco.prompts import class_prompts
from retrieval.search import RECO_MODES

RefineFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Refiner:
    image: RefineFn | None  # None: this side is not refined (no retrieval)
    text: RefineFn | None


FROZEN = Refiner(None, None)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def refine(side: str, refiner: Refiner, memory: Memory, queries: np.ndarray, k: int, mode_name: str,
           enabled: bool = True) -> np.ndarray:
    fn = refiner.image if side == "image" else refiner.text
    if fn is None or not enabled:
        return queries
    retrieved = memory.neighbours(queries, k, RECO_MODES[mode_name][side]).embeddings
    return _unit(fn(queries, retrieved))


def zero_shot(artefacts: Artefacts, task: Mapping[str, Any], refiner: Refiner, memory: Memory, k: int,
              mode_name: str) -> dict[str, float]:
    spec = SplitSpec.from_config(task)  # caption_key/label_keys: tasks on one split share one store
    store = artefacts.store(spec)
    labels = np.asarray(store.payload(task["label_key"]))
    prompts = class_prompts(task["prompts"], artefacts.builder(spec.dataset), task["label_key"])
    flat = [p for per_class in prompts for p in per_class]
    texts = refine("text", refiner, memory, artefacts.encoder.encode_texts(flat), k, mode_name,
                   task.get("refine_text", True))
    classes, start = [], 0
    for per_class in prompts:
        classes.append(texts[start:start + len(per_class)].mean(axis=0))
        start += len(per_class)
    images = refine("image", refiner, memory, np.asarray(store.embeddings("image"), np.float32), k, mode_name,
                    task.get("refine_image", True))
    metrics = zero_shot_metrics(images @ _unit(np.stack(classes)).T, labels)
    return {f"{task['name']}_{key}": value for key, value in metrics.items()}


def retrieval(artefacts: Artefacts, task: Mapping[str, Any], refiner: Refiner, memory: Memory, k: int,
              mode_name: str) -> dict[str, float]:
    """Image<->caption recall@1/5/10 over a split of pairs (each image's caption is its match)."""
    store = artefacts.store(SplitSpec.from_config(task))
    images = refine("image", refiner, memory, np.asarray(store.embeddings("image"), np.float32), k, mode_name,
                    task.get("refine_image", True))
    texts = refine("text", refiner, memory, np.asarray(store.embeddings("text"), np.float32), k, mode_name,
                   task.get("refine_text", False))
    metrics = retrieval_metrics(images, texts, np.arange(len(texts)))
    prefix = task.get("name", "")
    return {f"{prefix}{key}": value for key, value in metrics.items()}


def evaluate(artefacts: Artefacts, eval_config: Mapping[str, Any], refiner: Refiner, memory: Memory, k: int,
             mode_name: str) -> dict[str, float]:
    """Every zero-shot and retrieval task of `eval_config` -> one flat metrics dict."""
    out: dict[str, float] = {}
    for task in eval_config.get("zero_shot", ()):
        out.update(zero_shot(artefacts, task, refiner, memory, k, mode_name))
    for task in eval_config.get("retrieval", ()):
        out.update(retrieval(artefacts, task, refiner, memory, k, mode_name))
    return out
