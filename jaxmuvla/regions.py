"""Region inputs of µ-VLA: per image up to R detected regions, each a feature, a box, a class word.

Two sources give the same arrays (`Regions`):
  * the embedded world: its simulated detector's tags (noisy coarse class, jittered box, confidence,
    attribute words) as the detections, and region features from the world's frozen two-tower
    image tower (`TwoTowerEncoder.encode_regions`: "crop", each box resized and embedded like an
    image, or "patch", the box's patch tokens pooled);
  * real detector output in VinVL's format (`jaxmuvla.vinvl`: 2048-d features, boxes, classes).

The tag query of an image (what retrieves its sentences) is its distinct class words ranked by
how often and how large they were detected, as µ-VLA's public code builds it (`tag_query`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxmuvla.vinvl import ImageDetections, box5
from vlcore.errors import InputError


class RegionError(InputError):
    """Region inputs that cannot be built (bad settings, boxes or classes)."""


@dataclasses.dataclass(frozen=True)
class RegionSettings:
    """Which detections become regions, and how their features are made.

    max_regions: R, the regions kept per image (the most confident; the paper's VinVL input keeps
      up to 100). min_confidence, min_area_ratio: the paper's detection filters.
    feature: "crop" or "patch" (world only; see `TwoTowerEncoder.encode_regions`).
    attributes: whether attribute words join the class word in tags and queries ("red striped fish").
    """

    max_regions: int = 10
    min_confidence: float = 0.2
    min_area_ratio: float = 0.01
    feature: str = "crop"
    attributes: bool = True

    def __post_init__(self):
        if not 1 <= self.max_regions <= 100:
            raise RegionError(f"max_regions {self.max_regions}: expected 1..100")
        if not 0.0 <= self.min_confidence <= 1.0 or not 0.0 <= self.min_area_ratio <= 1.0:
            raise RegionError(f"min_confidence {self.min_confidence} and min_area_ratio {self.min_area_ratio}: "
                              "expected values in [0, 1]")
        if self.feature not in ("crop", "patch"):
            raise RegionError(f"feature {self.feature!r}: expected 'crop' or 'patch'")


@dataclasses.dataclass
class Regions:
    """The regions of n images, padded to R (`num` says how many are real).

    features [n, R, D] float32; boxes [n, R, 5] = [x1/W, y1/H, x2/W, y2/H, area/(W*H)];
    classes [n, R] int32 (index into the class vocabulary, -1 = padding); confidences [n, R];
    words [n][r]: the region's words (attributes + class word), one string per real region;
    num [n] int32.
    """

    features: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    confidences: np.ndarray
    words: list[list[str]]
    num: np.ndarray


def normalised_box5(boxes_yxyx: np.ndarray) -> np.ndarray:
    """[..., 4] TFDS boxes (ymin, xmin, ymax, xmax in [0, 1]) -> [..., 5] VisualBERT's box input
    [x1, y1, x2, y2, area] (`jaxmuvla.vinvl.box5` of the same box in a 1 x 1 image)."""
    b = np.asarray(boxes_yxyx, np.float32)
    return box5(b.reshape(-1, 4)[:, [1, 0, 3, 2]], 1.0, 1.0).reshape(*b.shape[:-1], 5)


def keep_detections(confidences: np.ndarray, areas: np.ndarray, settings: RegionSettings) -> np.ndarray:
    """Indices of the detections kept: confidence and area-ratio filters, then the R most confident
    (stable: equal confidences keep their detector order)."""
    ok = np.flatnonzero((np.asarray(confidences) >= settings.min_confidence)
                        & (np.asarray(areas) >= settings.min_area_ratio))
    order = ok[np.argsort(-np.asarray(confidences)[ok], kind="stable")]
    return order[:settings.max_regions]


def tag_query(words: Sequence[str], classes: Sequence[str], areas: Sequence[float]) -> str:
    """The image's query for sentence retrieval: one entry per distinct class, ranked by how many
    regions have it, then by their total area (largest first), each written with the words of its
    largest region ("red striped fish blue car")."""
    count: dict[str, int] = {}
    total: dict[str, float] = {}
    best: dict[str, tuple[float, str]] = {}
    for word, cls, area in zip(words, classes, areas):
        count[cls] = count.get(cls, 0) + 1
        total[cls] = total.get(cls, 0.0) + float(area)
        if cls not in best or area > best[cls][0]:
            best[cls] = (float(area), word)
    ranked = sorted(count, key=lambda c: (-count[c], -total[c], c))
    return " ".join(best[c][1] for c in ranked)


def world_regions(batch: dict, encoder, class_names: Sequence[str], settings: RegionSettings) -> Regions:
    """Regions of a batch of world examples (TFDS `vl_world` features, numpy).

    batch: "image" uint8 [n, H, W, 3] and the ragged "tags" of each example as lists: "tags_bbox"
    [n][t, 4] (ymin, xmin, ymax, xmax in [0, 1]), "tags_label" [n][t] class names,
    "tags_confidence" [n][t], "tags_attributes" [n][t]. encoder: a `TwoTowerEncoder`.
    """
    images = np.asarray(batch["image"])
    n, r = len(images), settings.max_regions
    vocab = {name: i for i, name in enumerate(class_names)}
    boxes = np.zeros((n, r, 4), np.float32)
    classes = np.full((n, r), -1, np.int32)
    confidences = np.zeros((n, r), np.float32)
    words: list[list[str]] = []
    for i in range(n):
        bbox = np.asarray(batch["tags_bbox"][i], np.float32).reshape(-1, 4)
        areas = (bbox[:, 2] - bbox[:, 0]) * (bbox[:, 3] - bbox[:, 1])
        keep = keep_detections(batch["tags_confidence"][i], areas, settings)
        labels = [_text(batch["tags_label"][i][j]) for j in keep]
        unknown = sorted(set(labels) - set(vocab))
        if unknown:
            raise RegionError(f"example {i}: detector classes {unknown} are not in the class vocabulary")
        attrs = [_text(batch["tags_attributes"][i][j]) if settings.attributes else "" for j in keep]
        boxes[i, :len(keep)] = bbox[keep]
        classes[i, :len(keep)] = [vocab[c] for c in labels]
        confidences[i, :len(keep)] = np.asarray(batch["tags_confidence"][i], np.float32)[keep]
        words.append([f"{a} {c}".strip() for a, c in zip(attrs, labels)])
    num = np.array([len(w) for w in words], np.int32)
    features = encoder.encode_regions(images, boxes, method=settings.feature, valid=classes >= 0)  # padding: zeros
    return Regions(features.astype(np.float32), normalised_box5(boxes) * (classes >= 0)[..., None], classes,
                   confidences, words, num)


def vinvl_regions(detections: Sequence[ImageDetections], class_names: Sequence[str],
                  settings: RegionSettings) -> Regions:
    """Regions of VinVL detections (already filtered by `jaxmuvla.vinvl`): 2048-d features, boxes
    from the predictions, classes in `class_names` (the detector's label map)."""
    n, r = len(detections), settings.max_regions
    vocab = {name: i for i, name in enumerate(class_names)}
    dim = detections[0].features.shape[1] if n else 2048
    features = np.zeros((n, r, dim), np.float32)
    boxes = np.zeros((n, r, 5), np.float32)
    classes = np.full((n, r), -1, np.int32)
    confidences = np.zeros((n, r), np.float32)
    words = []
    for i, det in enumerate(detections):
        areas = box5(det.boxes, det.image_w, det.image_h)[:, 4] if len(det.boxes) else np.zeros(0)
        keep = keep_detections(det.confidences, areas, settings)
        unknown = sorted({det.classes[j] for j in keep} - set(vocab))
        if unknown:
            raise RegionError(f"image {det.image_id}: classes {unknown[:5]} are not in the class vocabulary")
        features[i, :len(keep)] = det.features[keep]
        boxes[i, :len(keep)] = box5(det.boxes[keep], det.image_w, det.image_h) if len(keep) else 0
        classes[i, :len(keep)] = [vocab[det.classes[j]] for j in keep]
        confidences[i, :len(keep)] = det.confidences[keep]
        attrs = [" ".join(det.attributes[j][:2]) if settings.attributes and det.attributes else "" for j in keep]
        words.append([f"{a} {det.classes[j]}".strip() for a, j in zip(attrs, keep)])
    return Regions(features, boxes, classes, confidences, words, np.array([len(w) for w in words], np.int32))


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)
