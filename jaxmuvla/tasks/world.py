"""The embedded world's downstream tasks (TFDS `vl_world_tasks`) as `TaskExamples`, with their images.

A world task's config is generated under data_dir when it is missing (seconds; see
`vlcore.world.task_builder`), as `vl_world` is. Besides the examples, the reader returns the
images themselves with their simulated detector's tags (`WorldImages`), in the batch layout of
`jaxmuvla.regions.world_regions`, which turns them into region features.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxmuvla.tasks.common import TASKS, VE_LABELS, TaskDataError, TaskExamples
from jaxmuvla.tasks.vqa import build_answer_vocabulary, soft_scores


@dataclasses.dataclass
class WorldImages:
    """The distinct images of a split, in first-use order, as `world_regions` reads them.

    batch: "image" uint8 [n, 64, 64, 3]; per image lists: "tags_bbox" [t, 4] float32 (ymin, xmin,
    ymax, xmax in [0, 1]), "tags_label" [t] class names, "tags_confidence" [t] float32,
    "tags_attributes" [t] attribute words ("red dotted").
    """

    keys: list[str]
    batch: dict

    def __len__(self) -> int:
        return len(self.keys)


def load_world_task(data_dir: str | Path | None, task: str, size: str, split: str,
                    answers: tuple[str, ...] | None = None) -> tuple[TaskExamples, WorldImages]:
    """One split of `vl_world_tasks/{task}_{size}` (generated under data_dir when missing).

    answers: VQA's answer vocabulary; None builds it from the train split's
    multiple_choice_answers (most frequent first, ties alphabetical). Other tasks ignore it.
    """
    import tensorflow_datasets as tfds

    from vlcore.world import task_builder

    if task not in TASKS:
        raise TaskDataError(f"world task {task!r}: expected one of {TASKS}")
    if size not in task_builder.SIZES:
        raise TaskDataError(f"world task size {size!r}: expected one of {task_builder.SIZES}")
    builder = task_builder.prepare_task(data_dir, task, size)
    if split not in builder.info.splits:
        raise TaskDataError(f"vl_world_tasks/{task}_{size} has splits {sorted(builder.info.splits)}, not {split!r}")
    rows = sorted(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)), key=_order(task))
    blocks = [(r["left"], r["right"]) if task == "nlvr2" else (r,) for r in rows]
    images = _images([b for pair in blocks for b in pair])
    keys = [tuple(_text(b["image_id"]) for b in pair) for pair in blocks]

    extras: dict = {}
    vocabulary: tuple[str, ...] = ()
    if task == "vqa":
        if answers is None:
            train = rows if split == "train" else tfds.as_numpy(builder.as_dataset(
                split="train", decoders={"image": tfds.decode.SkipDecoding()}))
            answers = build_answer_vocabulary([{"multiple_choice_answer": _text(r["multiple_choice_answer"])}
                                               for r in train])
        vocabulary = tuple(answers)
        humans = [[_text(a) for a in r["answers"]] for r in rows]
        ids, texts, labels = [int(r["question_id"]) for r in rows], [_text(r["question"]) for r in rows], \
            soft_scores(humans, vocabulary)
        extras = {"human_answers": humans, "answer_type": [_text(r["answer_type"]) for r in rows],
                  "question_type": [_text(r["question_type"]) for r in rows]}
    elif task == "nlvr2":
        ids, texts = [_text(r["identifier"]) for r in rows], [_text(r["sentence"]) for r in rows]
        labels = np.array([bool(r["label"]) for r in rows], np.int32)
    elif task == "ve":
        ids, texts = [_text(r["pair_id"]) for r in rows], [_text(r["hypothesis"]) for r in rows]
        labels = np.array([VE_LABELS.index(_text(r["gold_label"])) for r in rows], np.int32)
    else:
        ids, texts = [int(r["sent_id"]) for r in rows], [_text(r["sentence"]) for r in rows]
        # TFDS (ymin, xmin, ymax, xmax) -> the region boxes' [x1/W, y1/H, x2/W, y2/H]
        labels = np.array([np.asarray(r["bbox"], np.float32)[[1, 0, 3, 2]] for r in rows], np.float32).reshape(-1, 4)
        extras = {"category": [_text(r["category"]) for r in rows], "ref_id": [int(r["ref_id"]) for r in rows]}
    examples = TaskExamples(task=task, split=split, ids=ids, texts=texts, images=keys, labels=labels,
                            answers=vocabulary, extras=extras)
    return examples, images


def _order(task: str):
    """Rows in generation order (TFDS stores them by a hash of their key)."""
    if task == "vqa":
        return lambda r: int(r["question_id"])
    if task == "refcoco":
        return lambda r: int(r["sent_id"])
    if task == "nlvr2":
        return lambda r: int(_text(r["identifier"]).split("-")[1])  # "{split}-{i}-0-0"
    return lambda r: _text(r["pair_id"])  # "ve-{split}-{image:06d}#{k}"


def _images(blocks: list[dict]) -> WorldImages:
    first: dict[str, dict] = {}
    for b in blocks:
        first.setdefault(_text(b["image_id"]), b)
    chosen = list(first.values())
    return WorldImages(keys=list(first), batch={
        "image": np.stack([b["image"] for b in chosen]).astype(np.uint8) if chosen
        else np.zeros((0, 64, 64, 3), np.uint8),
        "tags_bbox": [np.asarray(b["tags"]["bbox"], np.float32).reshape(-1, 4) for b in chosen],
        "tags_label": [[_text(x) for x in b["tags"]["label"]] for b in chosen],
        "tags_confidence": [np.asarray(b["tags"]["confidence"], np.float32) for b in chosen],
        "tags_attributes": [[_text(x) for x in b["tags"]["attributes"]] for b in chosen],
    })


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)
