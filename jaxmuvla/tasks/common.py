"""What every downstream reader returns: one split of one task as plain arrays and strings.

The four tasks differ only in their inputs per example (one image, or NLVR2's two) and their
targets; the rest of the pipeline (region features by image key, tokenisation, the heads,
fine-tuning, metrics) reads this one structure.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from vlcore.errors import InputError

TASKS = ("vqa", "nlvr2", "ve", "refcoco")
VE_LABELS = ("entailment", "neutral", "contradiction")


class TaskDataError(InputError):
    """A downstream dataset that cannot be read as asked (the message names the file and field)."""


@dataclasses.dataclass
class TaskExamples:
    """n examples of one split of one task.

    ids: the example's id in its dataset (VQA question_id, NLVR2 identifier, SNLI-VE pair id,
      RefCOCO+ sent_id), written back into result files.
    texts: the question / statement / hypothesis / referring expression.
    images: per example the keys of its images (1 tuple entry; NLVR2: 2, left then right), the
      keys under which region features are looked up (VinVL image ids, or the world's).
    labels:
      vqa     float32 [n, A]: the soft score min(1, #humans/3) of each answer of `answers`
      nlvr2   int32 [n]: 1 = "True", 0 = "False"
      ve      int32 [n]: index into VE_LABELS
      refcoco float32 [n, 4]: the gold box as [x1/W, y1/H, x2/W, y2/H] (the region boxes' layout)
    answers: vqa only, the answer vocabulary (index = the head's output).
    extras: per-task columns the metric needs, each a list or array of length n:
      vqa: "human_answers" (the 10 raw answers), "answer_type", "question_type";
      refcoco: "category" (the gold object's category name), "ref_id".
    """

    task: str
    split: str
    ids: list[Any]
    texts: list[str]
    images: list[tuple[str, ...]]
    labels: np.ndarray
    answers: tuple[str, ...] = ()
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.task not in TASKS:
            raise TaskDataError(f"task {self.task!r}: expected one of {TASKS}")
        n = len(self.ids)
        for name, value in (("texts", self.texts), ("images", self.images), ("labels", self.labels),
                            *self.extras.items()):
            if len(value) != n:
                raise TaskDataError(f"{self.task} {self.split}: {name} has {len(value)} rows, ids {n}")

    def __len__(self) -> int:
        return len(self.ids)

    def image_keys(self) -> list[str]:
        """Every distinct image key, in first-use order."""
        return list(dict.fromkeys(k for keys in self.images for k in keys))
