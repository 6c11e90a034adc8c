"""RefCOCO+: find the object a referring expression describes (the real `refs(unc).p` + `instances.json`).

`refs(unc).p` is a (Python 2) pickle of refs {ref_id, ann_id, image_id, split, category_id,
sentences: [{sent_id, sent, raw, tokens}], ...}; `instances.json` is COCO: `images` (id, width,
height), `annotations` (id, image_id, bbox [x, y, w, h], category_id), `categories` (id, name).
One example per sentence; its target is the gold object's box in the region boxes' layout
[x1/W, y1/H, x2/W, y2/H]. The pickle is read only with allow_pickle=True, and then as plain data
(`jaxmuvla.tasks.safe_pickle`).
"""

from __future__ import annotations

import os
import numpy as np

from jaxmuvla.tasks.common import TaskDataError, TaskExamples
from jaxmuvla.tasks.json_files import field, object_list, read_json
from jaxmuvla.tasks.safe_pickle import load_restricted_pickle

SPLITS = ("train", "val", "testA", "testB")  # the UNC splits RefCOCO+ is released with
# COCO boxes are stored rounded to 2 decimals, so x + w can pass the border by a hair
BORDER_TOLERANCE = 0.5  # pixels
NUMBER = (int, float)


def coco_index(instances_path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """({image_id: (W, H)}, {ann_id: (image_id, [x, y, w, h], category_id)}, {category_id: name})."""
    coco = read_json(instances_path)
    images = {}
    for i, image in enumerate(object_list(coco, "images", instances_path)):
        at = f"{instances_path}: images[{i}]"
        width, height = field(image, "width", NUMBER, at), field(image, "height", NUMBER, at)
        if width <= 0 or height <= 0:
            raise TaskDataError(f"{at}: size {width}x{height}, expected positive width and height")
        images[field(image, "id", int, at)] = (width, height)
    annotations = {}
    for i, ann in enumerate(object_list(coco, "annotations", instances_path)):
        at = f"{instances_path}: annotations[{i}]"
        box = field(ann, "bbox", list, at)
        if len(box) != 4 or not all(isinstance(v, NUMBER) and not isinstance(v, bool) for v in box):
            raise TaskDataError(f"{at}: field 'bbox' is {box!r:.60}, expected [x, y, w, h] numbers")
        annotations[field(ann, "id", int, at)] = (field(ann, "image_id", int, at), box,
                                                 field(ann, "category_id", int, at))
    categories = {}
    for i, category in enumerate(object_list(coco, "categories", instances_path)):
        at = f"{instances_path}: categories[{i}]"
        categories[field(category, "id", int, at)] = field(category, "name", str, at)
    return images, annotations, categories


def normalized_box(box: list[float], width: float, height: float, where: str) -> list[float]:
    """COCO [x, y, w, h] in pixels -> [x1/W, y1/H, x2/W, y2/H], refused when outside the image."""
    x, y, w, h = box
    t = BORDER_TOLERANCE
    if w <= 0 or h <= 0 or x < -t or y < -t or x + w > width + t or y + h > height + t:
        raise TaskDataError(f"{where}: bbox {box} is not inside its {width}x{height} image")
    return [min(max(v, 0.0), 1.0) for v in (x / width, y / height, (x + w) / width, (y + h) / height)]


def read_refcoco(refs_path: str | os.PathLike, instances_path: str | os.PathLike, split: str,
                 allow_pickle: bool = False) -> TaskExamples:
    """One RefCOCO+ split: ids sent_id, texts the sentences, labels float32 [n, 4] normalised gold boxes."""
    if split not in SPLITS:
        raise TaskDataError(f"split {split!r}: expected one of {SPLITS}")
    refs = load_restricted_pickle(refs_path, allow_pickle)
    if not isinstance(refs, list):
        raise TaskDataError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    images, annotations, categories = coco_index(instances_path)
    ids, texts, keys, boxes, category_names, ref_ids = [], [], [], [], [], []
    for i, ref in enumerate(refs):
        at = f"{refs_path}: refs[{i}]"
        if field(ref, "split", str, at) != split:
            continue
        ref_id = field(ref, "ref_id", int, at)
        at = f"{at} (ref_id {ref_id})"
        ann_id, image_id = field(ref, "ann_id", int, at), field(ref, "image_id", int, at)
        if ann_id not in annotations:
            raise TaskDataError(f"{at}: ann_id {ann_id} is not in {instances_path}")
        if image_id not in images:
            raise TaskDataError(f"{at}: image_id {image_id} is not in {instances_path}")
        ann_image, box, category_id = annotations[ann_id]
        if ann_image != image_id:
            raise TaskDataError(f"{at}: ann_id {ann_id} is on image {ann_image} in {instances_path}, "
                                f"the ref says {image_id}")
        if category_id not in categories:
            raise TaskDataError(f"{instances_path}: category_id {category_id} of ann_id {ann_id} is not a category")
        gold = normalized_box(box, *images[image_id], f"{at}: ann_id {ann_id}")
        sentences = field(ref, "sentences", list, at)
        if not sentences:
            raise TaskDataError(f"{at}: field 'sentences' is empty")
        for j, sentence in enumerate(sentences):
            where = f"{at}: sentences[{j}]"
            ids.append(field(sentence, "sent_id", int, where))
            texts.append(field(sentence, "sent", str, where))
            keys.append((str(image_id),))
            boxes.append(gold)
            category_names.append(categories[category_id])
            ref_ids.append(ref_id)
    if not ids:
        raise TaskDataError(f"{refs_path}: no refs of split {split!r}")
    return TaskExamples(task="refcoco", split=split, ids=ids, texts=texts, images=keys,
                        labels=np.asarray(boxes, np.float32).reshape(-1, 4),
                        extras={"category": category_names, "ref_id": ref_ids})
