"""NLVR2: a statement about a pair of images, true or false (the real `{split}.json` JSON Lines files).

Each line holds `identifier` ("dev-850-0-1": split, set, pair, sentence), `sentence` and `label`
("True" | "False"). The pair's images are the identifier without its sentence number and with
"-img0" (left) or "-img1" (right): "dev-850-0-1" -> "dev-850-0-img0", "dev-850-0-img1", the names
of the released images and of their region features.
"""

from __future__ import annotations

import os

import numpy as np

from jaxmuvla.tasks.common import TaskDataError, TaskExamples
from jaxmuvla.tasks.json_files import field, jsonl_records

LABELS = {"True": 1, "False": 0}  # the files' spelling exactly; anything else is an error


def pair_images(identifier: str) -> tuple[str, str]:
    """("dev-850-0-img0", "dev-850-0-img1") of "dev-850-0-1"."""
    prefix, _, sentence = identifier.rpartition("-")
    if not prefix or not sentence.isdigit():
        raise ValueError("expected SPLIT-SET-PAIR-SENTENCE, e.g. 'dev-850-0-1'")
    return f"{prefix}-img0", f"{prefix}-img1"


def read_nlvr2(jsonl_path: str | os.PathLike, split: str) -> TaskExamples:
    """One NLVR2 split: labels int32 [n] (1 = True), images (left, right), ids = identifier."""
    ids, texts, images, labels = [], [], [], []
    first_line: dict[str, int] = {}
    for number, record in jsonl_records(jsonl_path):
        at = f"{jsonl_path}: line {number}"
        identifier = field(record, "identifier", str, at)
        if identifier in first_line:
            raise TaskDataError(f"{at}: identifier {identifier!r} already on line {first_line[identifier]}")
        first_line[identifier] = number
        try:
            images.append(pair_images(identifier))
        except ValueError as e:
            raise TaskDataError(f"{at}: field 'identifier' is {identifier!r}, {e}") from None
        label = field(record, "label", str, at)
        if label not in LABELS:
            raise TaskDataError(f"{at}: field 'label' is {label!r}, expected \"True\" or \"False\"")
        ids.append(identifier)
        texts.append(field(record, "sentence", str, at))
        labels.append(LABELS[label])
    if not ids:
        raise TaskDataError(f"{jsonl_path}: no examples (split {split!r})")
    return TaskExamples(task="nlvr2", split=split, ids=ids, texts=texts, images=images,
                        labels=np.asarray(labels, np.int32))
