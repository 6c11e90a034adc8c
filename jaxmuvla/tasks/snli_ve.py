"""SNLI-VE: does a Flickr30k image entail a hypothesis (the real `snli_ve_{split}.jsonl` files)?

Each line holds `Flikr30kID` (sic, "1000092795.jpg"), `sentence2` (the hypothesis; `sentence1`
is the SNLI premise, a caption the task hides) and `gold_label`, one of `VE_LABELS`.
"""

from __future__ import annotations

import os

import numpy as np

from jaxmuvla.tasks.common import VE_LABELS, TaskDataError, TaskExamples
from jaxmuvla.tasks.json_files import field, jsonl_records


def read_snli_ve(jsonl_path: str | os.PathLike, split: str) -> TaskExamples:
    """One SNLI-VE split: labels int32 [n] index into VE_LABELS, image key the file name without
    ".jpg" ("1000092795"), ids the `pairID` (or, in files without it, the line's index from 0)."""
    ids, texts, images, labels = [], [], [], []
    for number, record in jsonl_records(jsonl_path):
        at = f"{jsonl_path}: line {number}"
        image = field(record, "Flikr30kID", str, at)
        key = os.path.splitext(image)[0]
        if not key:
            raise TaskDataError(f"{at}: field 'Flikr30kID' is {image!r}, expected an image file name")
        label = field(record, "gold_label", str, at)
        if label not in VE_LABELS:
            raise TaskDataError(f"{at}: field 'gold_label' is {label!r}, expected one of {VE_LABELS}")
        ids.append(field(record, "pairID", str, at) if "pairID" in record else number - 1)
        texts.append(field(record, "sentence2", str, at))
        images.append((key,))
        labels.append(VE_LABELS.index(label))
    if not ids:
        raise TaskDataError(f"{jsonl_path}: no examples (split {split!r})")
    return TaskExamples(task="ve", split=split, ids=ids, texts=texts, images=images,
                        labels=np.asarray(labels, np.int32))
