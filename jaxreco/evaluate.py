"""RECO's evaluations: zero-shot classification and image-text retrieval, each side refinable.

A `Refiner` turns (frozen query embeddings [n, d], retrieved payload embeddings [n, k, d]) into
refined embeddings, per modality: the trained fusion, the untrained mean of the neighbours, or
nothing (the frozen baseline: the same code path with no retrieval at all). Which sides are
refined is a switch per evaluation (the paper refines both for classification, and found that
refining the text side can hallucinate in text->image retrieval; on the world both choices are
reported).

Zero-shot classification follows CLIP: every class prompt is embedded (and refined) on its own,
the prompts of a class are averaged and re-normalised; metrics are LAION clip_benchmark's
(acc@1, acc@5, mean per-class recall).

With several JAX processes every process runs the evaluation: the searches and refinements (the
costly part) are split over the processes and gathered, and each computes the same metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from jaxreco.data import Artefacts, Memory, SplitSpec
from jaxreco.prompts import class_prompts
from retrieval.search import RECO_MODES
from vlcore.clip_benchmark import (class_embeddings, class_match_retrieval_metrics, flatten_prompts,
                                   retrieval_metrics, zero_shot_metrics)
from vlcore.encoders.layers import l2_normalize
from vlcore.process_shares import map_over_processes

RefineFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Refiner:
    image: RefineFn | None  # None: this side is not refined (no retrieval)
    text: RefineFn | None


FROZEN = Refiner(None, None)


def refine(side: str, refiner: Refiner, memory: Memory, queries: np.ndarray, k: int, mode_name: str,
           enabled: bool = True) -> np.ndarray:
    """queries [n, d] -> refined [n, d] (unit norm), or the queries themselves when not refined."""
    fn = refiner.image if side == "image" else refiner.text
    if fn is None or not enabled:
        return queries
    def refine_share(q: np.ndarray) -> np.ndarray:
        retrieved = memory.neighbours(q, k, RECO_MODES[mode_name][side]).embeddings
        return np.asarray(l2_normalize(np.asarray(fn(q, retrieved), np.float32)))

    # Each JAX process searches and refines its share of the queries; all get every row back.
    return map_over_processes(refine_share, np.asarray(queries, np.float32))


def zero_shot(artefacts: Artefacts, task: Mapping[str, Any], refiner: Refiner, memory: Memory, k: int,
              mode_name: str, per_example: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """acc@1, acc@5 and mean per-class recall; per_example[name + "_hit1"] gets the top-1 hits [n]."""
    spec = SplitSpec.from_config(task)  # caption_key/label_keys: tasks on one split share one store
    store = artefacts.store(spec)
    labels = np.asarray(store.payload(task["label_key"]))
    prompts, counts = flatten_prompts(class_prompts(task["prompts"], artefacts.builder(spec.dataset),
                                                    task["label_key"]))
    # Every prompt is refined on its own, then the templates of a class are averaged (CLIP's ensembling).
    texts = refine("text", refiner, memory, artefacts.encoder.encode_texts(prompts), k, mode_name,
                   task.get("refine_text", True))
    images = refine("image", refiner, memory, np.asarray(store.embeddings("image"), np.float32), k, mode_name,
                    task.get("refine_image", True))
    logits = images @ class_embeddings(texts, counts).T
    if per_example is not None:
        per_example[f"{task['name']}_hit1"] = np.argmax(logits, axis=1) == labels  # argmax: ties to the lower class
    return {f"{task['name']}_{key}": value for key, value in zero_shot_metrics(logits, labels).items()}


def retrieval(artefacts: Artefacts, task: Mapping[str, Any], refiner: Refiner, memory: Memory, k: int,
              mode_name: str) -> dict[str, float]:
    """Image<->caption recall@1/5/10 over a split of pairs.

    task["match"]: "pair" (the default; a hit is the query's own caption or image, as COCO's
    retrieval benchmark) or "label" (a hit is any result of the query's class, task["label_key"]:
    the Recall@k of fine-grained retrieval on CUB and Cars, for splits whose captions do not single
    out one image).
    """
    store = artefacts.store(SplitSpec.from_config(task))
    images = refine("image", refiner, memory, np.asarray(store.embeddings("image"), np.float32), k, mode_name,
                    task.get("refine_image", True))
    texts = refine("text", refiner, memory, np.asarray(store.embeddings("text"), np.float32), k, mode_name,
                   task.get("refine_text", False))
    match = task.get("match", "pair")
    if match == "label":
        labels = np.asarray(store.payload(task["label_key"]))
        metrics = class_match_retrieval_metrics(images, texts, labels, labels)
    elif match == "pair":
        metrics = retrieval_metrics(images, texts, np.arange(len(texts)))
    else:
        raise ValueError(f"retrieval task {task.get('name', '')!r}: match {match!r}, expected 'pair' or 'label'")
    prefix = task.get("name", "")
    return {f"{prefix}{key}": value for key, value in metrics.items()}


def evaluate(artefacts: Artefacts, eval_config: Mapping[str, Any], refiner: Refiner, memory: Memory, k: int,
             mode_name: str, per_example: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Every zero-shot and retrieval task of `eval_config` -> one flat metrics dict (and, into
    `per_example`, each zero-shot task's top-1 hits, for paired comparisons of two models)."""
    out: dict[str, float] = {}
    for task in eval_config.get("zero_shot", ()):
        out.update(zero_shot(artefacts, task, refiner, memory, k, mode_name, per_example))
    for task in eval_config.get("retrieval", ()):
        out.update(retrieval(artefacts, task, refiner, memory, k, mode_name))
    return out
