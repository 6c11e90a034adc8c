"""Streaming readers (and writers) of the VinVL detector's outputs: features.tsv and predictions.tsv.

µ-VLA's image side is a bag of regions detected by VinVL (Zhang et al., 2021). VinVL writes two
TSV files per image set, one row per image::

    features.tsv     image_id \\t num_boxes \\t base64(float32 [num_boxes, D])
                     D = 2048, or 2054 when the normalised box [x1/W, y1/H, x2/W, y2/H, w/W, h/H]
                     is appended (split off here: `features` is always [n, 2048]);
                     the variant image_id \\t {"num_boxes": n, "features": base64} is read too
    predictions.tsv  image_id \\t {"image_h": H, "image_w": W, "objects": [{"rect": [x1, y1, x2, y2],
                     "class": str, "conf": float, "attributes": [str], "attr_scores": [float]}, ...]}
                     ("attributes" and "attr_scores" optional; "rect" in pixels)

Object i of a predictions row is feature row i of the same image. A ``.lineidx`` beside a TSV
(VinVL's convention: ``features.tsv`` -> ``features.lineidx``) holds the byte offset of each row,
one decimal number a line; with it rows are found by seeking instead of scanning.

Real files are hundreds of GB, so nothing here loads a whole TSV: rows are read one at a time.
Row numbers in messages are 1-based lines of the TSV.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import json
import math
import os
from array import array
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Literal, Sequence

import numpy as np

from vlcore.errors import InputError

__all__ = [
    "VinvlError",
    "ImageDetections",
    "ReadStats",
    "DetectionReader",
    "DetectionTable",
    "read_detections",
    "write_features",
    "write_predictions",
    "write_detections",
    "lineidx_path",
    "box5",
    "FEATURE_DIM",
]

FEATURE_DIM = 2048
BOX_DIM = 6  # the normalised box VinVL may append to each feature row
_WIDTHS = (FEATURE_DIM, FEATURE_DIM + BOX_DIM)
_ID_PROBE = 256  # bytes read at a row start to find its id; a longer id falls back to readline
_SCAN_CHUNK = 1 << 20
_MISSING = ("error", "skip")


class VinvlError(InputError):
    """A VinVL features/predictions TSV (or its .lineidx) that does not hold what is documented above."""


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDetections:
    """One image's kept regions; row i of every per-region field is region i (in the file's order)."""

    image_id: str
    image_h: int
    image_w: int
    features: np.ndarray  # float32 [n, 2048]
    boxes: np.ndarray  # float32 [n, 4] pixel x1, y1, x2, y2
    classes: tuple[str, ...]
    confidences: np.ndarray  # float32 [n]
    attributes: tuple[tuple[str, ...], ...]  # [n] tuples; () for a region (or file) without them
    feature_boxes: np.ndarray | None = None  # float32 [n, 6] feature columns 2048:2054 when D = 2054

    @property
    def num_regions(self) -> int:
        return int(self.features.shape[0])


@dataclasses.dataclass
class ReadStats:
    """What a `DetectionReader` has done so far (final once it is exhausted)."""

    images: int = 0  # images yielded
    missing_features: int = 0  # skipped (missing="skip"): in predictions.tsv, not in features.tsv
    missing_predictions: int = 0  # skipped (missing="skip"): in features.tsv, not in predictions.tsv
    regions_read: int = 0  # detections of the yielded images before filtering
    regions_kept: int = 0
    seeked: bool = False  # the files were not in the same order: features rows were found by offset


def lineidx_path(tsv: str | os.PathLike) -> Path:
    """VinVL's .lineidx beside a TSV: ``a/features.tsv`` -> ``a/features.lineidx``."""
    return Path(tsv).with_suffix(".lineidx")


def box5(boxes: np.ndarray, image_w: float, image_h: float) -> np.ndarray:
    """[n, 4] pixel x1, y1, x2, y2 -> float32 [n, 5] [x1/W, y1/H, x2/W, y2/H, area/(W*H)].

    The region position input of VisualBERT / µ-VLA.
    """
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes: expected shape [n, 4], got {b.shape}")
    if not (image_w > 0 and image_h > 0):
        raise ValueError(f"image size must be positive, got {image_w}x{image_h}")
    out = np.empty((b.shape[0], 5), np.float64)
    out[:, 0] = b[:, 0] / image_w
    out[:, 1] = b[:, 1] / image_h
    out[:, 2] = b[:, 2] / image_w
    out[:, 3] = b[:, 3] / image_h
    out[:, 4] = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (image_w * image_h)
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------------
# filters


@dataclasses.dataclass(frozen=True)
class _Filters:
    min_confidence: float
    min_area_ratio: float
    max_regions: int | None

    def __post_init__(self) -> None:
        for name in ("min_confidence", "min_area_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise VinvlError(f"{name}: expected a finite number, got {v!r}")
        m = self.max_regions
        if m is not None and (not _is_int(m) or m < 1):
            raise VinvlError(f"max_regions: expected a positive int or None, got {m!r}")

    def select(self, boxes: np.ndarray, conf: np.ndarray, image_w: int, image_h: int) -> np.ndarray:
        """Indices (ascending) of the kept detections: confident, large enough, then the top max_regions."""
        area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
        keep = np.flatnonzero((conf >= self.min_confidence)
                              & (area / (image_w * image_h) >= self.min_area_ratio))
        if self.max_regions is not None and keep.size > self.max_regions:
            # stable: among equal confidences the earlier detection wins; kept rows stay in file order
            top = np.argsort(-conf[keep], kind="stable")[: self.max_regions]
            keep = np.sort(keep[top])
        return keep


# --------------------------------------------------------------------------------------------
# row parsing


@dataclasses.dataclass(frozen=True, eq=False)
class _Prediction:
    image_id: str
    image_h: int
    image_w: int
    boxes: np.ndarray  # float64 [n, 4]
    classes: tuple[str, ...]
    conf: np.ndarray  # float64 [n]
    attributes: tuple[tuple[str, ...], ...]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _columns(line: bytes, path: Path, row: int) -> list[str]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise VinvlError(f"{path}: line {row + 1}: not UTF-8 text") from None
    return text.rstrip("\r\n").split("\t")


def _parse_features(line: bytes, path: Path, row: int) -> tuple[str, np.ndarray]:
    """(image_id, float32 [num_boxes, D] with D in {2048, 2054}) of one features.tsv row."""
    cols = _columns(line, path, row)
    if len(cols) == 3:
        image_id, num, payload = cols
    elif len(cols) == 2 and cols[1].startswith("{"):
        image_id = cols[0]
        where = f"{path}: line {row + 1} (image {image_id!r})"
        try:
            obj = json.loads(cols[1])
            num, payload = obj["num_boxes"], obj["features"]
        except json.JSONDecodeError as e:
            raise VinvlError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
        except (KeyError, TypeError):
            raise VinvlError(f"{where}: expected a JSON object with 'num_boxes' and 'features'") from None
    else:
        raise VinvlError(f"{path}: line {row + 1}: expected 3 tab-separated columns "
                         f"(image_id, num_boxes, base64 features), got {len(cols)}")
    where = f"{path}: line {row + 1} (image {image_id!r})"
    if _is_int(num):
        n = num
    elif isinstance(num, str) and num.isascii() and num.isdigit():
        n = int(num)
    else:
        raise VinvlError(f"{where}: num_boxes is {num!r}, expected a non-negative integer")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise VinvlError(f"{where}: the features column is not valid base64") from None
    for d in _WIDTHS:
        if len(raw) == n * d * 4:
            return image_id, np.frombuffer(raw, dtype="<f4").reshape(n, d)
    a, b = (n * d * 4 for d in _WIDTHS)
    raise VinvlError(f"{where}: base64 features decode to {len(raw)} bytes, expected num_boxes ({n}) "
                     f"x {_WIDTHS[0]} or {_WIDTHS[1]} float32 = {a} or {b} bytes")


def _field(obj: dict, key: str, where: str) -> Any:
    try:
        return obj[key]
    except KeyError:
        raise VinvlError(f"{where}: missing field {key!r}") from None


def _parse_predictions(line: bytes, path: Path, row: int) -> _Prediction:
    cols = _columns(line, path, row)
    if len(cols) != 2:
        raise VinvlError(f"{path}: line {row + 1}: expected 2 tab-separated columns "
                         f"(image_id, JSON), got {len(cols)}")
    image_id, text = cols
    where = f"{path}: line {row + 1} (image {image_id!r})"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise VinvlError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise VinvlError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    size = []
    for key in ("image_h", "image_w"):
        v = _field(obj, key, where)
        # some writers store sizes as 480.0; anything else non-integral is a corrupt row
        if not _is_number(v) or v <= 0 or v != int(v):
            raise VinvlError(f"{where}: field {key!r} is {v!r}, expected a positive integer")
        size.append(int(v))
    objects = _field(obj, "objects", where)
    if not isinstance(objects, list):
        raise VinvlError(f"{where}: field 'objects' must be a list, got {type(objects).__name__}")
    n = len(objects)
    boxes = np.empty((n, 4), np.float64)
    conf = np.empty((n,), np.float64)
    classes, attributes = [], []
    for k, o in enumerate(objects):
        at = f"{where}: objects[{k}]"
        if not isinstance(o, dict):
            raise VinvlError(f"{at}: expected a JSON object, got {type(o).__name__}")
        rect = _field(o, "rect", at)
        if not isinstance(rect, list) or len(rect) != 4 or not all(_is_number(v) for v in rect):
            raise VinvlError(f"{at}: field 'rect' is {rect!r}, expected [x1, y1, x2, y2] numbers")
        cls = _field(o, "class", at)
        if not isinstance(cls, str):
            raise VinvlError(f"{at}: field 'class' is {cls!r}, expected a string")
        c = _field(o, "conf", at)
        if not _is_number(c):
            raise VinvlError(f"{at}: field 'conf' is {c!r}, expected a number")
        attrs = o.get("attributes", [])
        if not isinstance(attrs, list) or not all(isinstance(a, str) for a in attrs):
            raise VinvlError(f"{at}: field 'attributes' is {attrs!r}, expected a list of strings")
        boxes[k] = rect
        conf[k] = c
        classes.append(cls)
        attributes.append(tuple(attrs))
    return _Prediction(image_id, size[0], size[1], boxes, tuple(classes), conf, tuple(attributes))


def _combine(pred: _Prediction, pred_path: Path, pred_row: int, values: np.ndarray,
             feat_path: Path, feat_row: int, filters: _Filters) -> ImageDetections:
    n = len(pred.classes)
    if values.shape[0] != n:
        raise VinvlError(
            f"image {pred.image_id!r}: {feat_path} line {feat_row + 1} has num_boxes {values.shape[0]} "
            f"but {pred_path} line {pred_row + 1} lists {n} objects")
    keep = filters.select(pred.boxes, pred.conf, pred.image_w, pred.image_h)
    kept = values[keep].astype(np.float32)  # a copy: the decoded buffer is read-only
    return ImageDetections(
        image_id=pred.image_id,
        image_h=pred.image_h,
        image_w=pred.image_w,
        features=np.ascontiguousarray(kept[:, :FEATURE_DIM]),
        boxes=pred.boxes[keep].astype(np.float32),
        classes=tuple(pred.classes[i] for i in keep),
        confidences=pred.conf[keep].astype(np.float32),
        attributes=tuple(pred.attributes[i] for i in keep),
        feature_boxes=(np.ascontiguousarray(kept[:, FEATURE_DIM:])
                       if values.shape[1] > FEATURE_DIM else None),
    )


# --------------------------------------------------------------------------------------------
# one TSV: rows in order, rows at an offset, an image-id index


def _first_column(line: bytes) -> bytes:
    t = line.find(b"\t")
    return line[:t] if t != -1 else line.rstrip(b"\r\n")


def _scan_ids(path: Path) -> Iterator[tuple[int, bytes]]:
    """(offset, first column) of every row, reading big chunks and keeping only the ids."""
    with open(path, "rb") as f:
        yield from _scan_ids_in(f)


def _scan_ids_in(f: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    start = pos = 0  # offset of the current row; offset of chunk[0]
    key: bytearray | None = bytearray()  # the current row's id so far; None once past its tab
    while chunk := f.read(_SCAN_CHUNK):
        i = 0
        while i < len(chunk):
            if key is None:  # inside a row's payload: skip to its end
                e = chunk.find(b"\n", i)
                if e == -1:
                    break
                start, key, i = pos + e + 1, bytearray(), e + 1
                continue
            ends = [j for j in (chunk.find(b"\t", i), chunk.find(b"\n", i)) if j != -1]
            if not ends:
                key += chunk[i:]
                break
            j = min(ends)
            key += chunk[i:j]
            yield start, bytes(key)
            if chunk[j] == 0x0A:  # a row without a tab; reading it will report it
                start, key = pos + j + 1, bytearray()
            else:
                key = None
            i = j + 1
        pos += len(chunk)
    if key:  # a last row without a newline nor a tab
        yield start, bytes(key)


class _Tsv:
    """One TSV and its optional .lineidx: rows in order, a row at an offset, an image-id index."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise VinvlError(f"{self.path}: no such file")
        self.lineidx = lineidx_path(self.path)
        self._fh: IO[bytes] | None = None
        self._offsets: array | None = None
        self._offsets_read = False  # the .lineidx was looked for (and read if it exists)
        self._index: dict[str, int] | None = None  # image id -> row
        self._row_offsets: array | None = None  # row -> byte offset, with _index

    def handle(self) -> IO[bytes]:
        if self._fh is None:
            self._fh = open(self.path, "rb")
        return self._fh

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def rows(self) -> Iterator[tuple[int, bytes]]:
        """(row, line) in file order; one row in memory at a time."""
        with open(self.path, "rb") as f:
            yield from enumerate(f)

    def offsets(self) -> array | None:
        """The .lineidx's row offsets (None without one), checked against the TSV's ends."""
        if not self._offsets_read and self.lineidx.is_file():
            offsets = array("q")
            with open(self.lineidx, "rb") as f:
                for k, raw in enumerate(f):
                    s = raw.strip()
                    if not (s.isdigit() and (not offsets or int(s) > offsets[-1])):
                        raise VinvlError(f"{self.lineidx}: line {k + 1} is {raw[:40]!r}, expected a byte "
                                         "offset (non-negative, increasing integers one a line)")
                    offsets.append(int(s))
            size = self.path.stat().st_size
            mismatch = (f"{self.lineidx} does not match {self.path} ({len(offsets)} offsets, "
                        f"{size} bytes): rebuild or delete it")
            if (not offsets) != (size == 0) or (offsets and (offsets[0] != 0 or offsets[-1] >= size)):
                raise VinvlError(mismatch)
            if offsets:  # the last offset must start the last row: catches a lineidx of a shorter TSV
                self.read_at(len(offsets) - 1, offsets[-1])
                if self.handle().tell() != size:
                    raise VinvlError(mismatch)
            self._offsets = offsets
        self._offsets_read = True
        return self._offsets

    def _not_a_row(self, row: int, offset: int) -> VinvlError:
        return VinvlError(f"{self.lineidx}: line {row + 1} (byte {offset}) is not the start of a row "
                          f"of {self.path}: the .lineidx does not match its TSV; rebuild or delete it")

    def read_at(self, row: int, offset: int) -> bytes:
        """The line starting at `offset` (row `row`); checks that a row really starts there."""
        f = self.handle()
        if offset:
            f.seek(offset - 1)
            if f.read(1) != b"\n":
                raise self._not_a_row(row, offset)
        else:
            f.seek(0)
        line = f.readline()
        if not line:
            raise self._not_a_row(row, offset)
        return line

    def _ids_from_lineidx(self, offsets: array) -> Iterator[tuple[int, bytes]]:
        f = self.handle()
        for row, offset in enumerate(offsets):
            f.seek(offset - 1 if offset else 0)
            head = f.read(_ID_PROBE + 1)
            if offset:
                if head[:1] != b"\n":
                    raise self._not_a_row(row, offset)
                head = head[1:]
            if b"\t" not in head and b"\n" not in head:
                head = self.read_at(row, offset)
            yield offset, _first_column(head.split(b"\n", 1)[0] + b"\n")

    def index(self) -> tuple[dict[str, int], array]:
        """(image id -> row, row -> offset): from the .lineidx (one short read a row) or one scan."""
        if self._index is None:
            offsets = self.offsets()
            pairs = self._ids_from_lineidx(offsets) if offsets is not None else _scan_ids(self.path)
            index: dict[str, int] = {}
            row_offsets = array("q")
            try:
                for row, (offset, raw) in enumerate(pairs):
                    try:
                        image_id = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        raise VinvlError(f"{self.path}: line {row + 1}: not UTF-8 text") from None
                    if not image_id:
                        raise VinvlError(f"{self.path}: line {row + 1}: empty image id")
                    prev = index.setdefault(image_id, row)
                    if prev != row:
                        raise VinvlError(f"{self.path}: line {row + 1}: image {image_id!r} "
                                         f"already has line {prev + 1}")
                    row_offsets.append(offset)
            finally:
                pairs.close()  # closes the scan's file
            self._index, self._row_offsets = index, row_offsets
        return self._index, self._row_offsets


# --------------------------------------------------------------------------------------------
# readers


class DetectionReader(Iterator[ImageDetections]):
    """Iterator over the images of predictions.tsv in its order; `stats` counts what was done.

    Rows are read in lockstep while both files list the same images in the same order; at the
    first disagreement the reader switches to finding each image's features row by offset (from
    features.lineidx, or an id -> offset map built by one scan reading only the first column).
    An image in one file only is a `VinvlError`, or with missing="skip" is skipped and counted in
    `stats`; images only in features.tsv are found once predictions.tsv is exhausted.
    """

    def __init__(self, features_tsv: str | os.PathLike, predictions_tsv: str | os.PathLike,
                 filters: _Filters, missing: Literal["error", "skip"]):
        if missing not in _MISSING:
            raise VinvlError(f"missing: expected one of {_MISSING}, got {missing!r}")
        self._feat = _Tsv(features_tsv)
        self._pred = _Tsv(predictions_tsv)
        self._filters = filters
        self._missing = missing
        self.stats = ReadStats()
        self._gen = self._generate()

    def __iter__(self) -> "DetectionReader":
        return self

    def __next__(self) -> ImageDetections:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()
        self._feat.close()

    def __enter__(self) -> "DetectionReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _missing_features(self, image_id: str, row: int) -> None:
        if self._missing == "error":
            raise VinvlError(f"{self._pred.path}: line {row + 1}: image {image_id!r} has no row in "
                             f"{self._feat.path} (missing='skip' skips such images)")
        self.stats.missing_features += 1

    def _missing_predictions(self, image_id: str, row: int) -> None:
        if self._missing == "error":
            raise VinvlError(f"{self._feat.path}: line {row + 1}: image {image_id!r} has no row in "
                             f"{self._pred.path} (missing='skip' skips such images)")
        self.stats.missing_predictions += 1

    def _emit(self, pred: _Prediction, pred_row: int, values: np.ndarray, feat_row: int) -> ImageDetections:
        det = _combine(pred, self._pred.path, pred_row, values, self._feat.path, feat_row, self._filters)
        self.stats.images += 1
        self.stats.regions_read += len(pred.classes)
        self.stats.regions_kept += det.num_regions
        return det

    def _generate(self) -> Iterator[ImageDetections]:
        feat_rows: Iterator[tuple[int, bytes]] | None = self._feat.rows()
        index: dict[str, int] | None = None
        lockstep = 0  # features rows consumed in lockstep (the first ones)
        consumed = bytearray()  # per features row, once out of lockstep
        try:
            for pred_row, line in self._pred.rows():
                pred = _parse_predictions(line, self._pred.path, pred_row)
                if feat_rows is not None:
                    nxt = next(feat_rows, None)
                    if nxt is not None and _first_column(nxt[1]).decode("utf-8", "replace") == pred.image_id:
                        feat_row, feat_line = nxt
                        _, values = _parse_features(feat_line, self._feat.path, feat_row)
                        lockstep += 1
                        yield self._emit(pred, pred_row, values, feat_row)
                        continue
                    # out of lockstep (reordered, or an image missing from one file): seek from now on
                    feat_rows.close()
                    feat_rows = None
                    self.stats.seeked = True
                    index, row_offsets = self._feat.index()
                    consumed = bytearray(len(row_offsets))
                    consumed[:lockstep] = b"\1" * min(lockstep, len(consumed))
                assert index is not None
                feat_row = index.get(pred.image_id)
                if feat_row is None:
                    self._missing_features(pred.image_id, pred_row)
                    continue
                if consumed[feat_row]:
                    raise VinvlError(f"{self._pred.path}: line {pred_row + 1}: image {pred.image_id!r} "
                                     "appears twice in the predictions")
                consumed[feat_row] = 1
                feat_line = self._feat.read_at(feat_row, row_offsets[feat_row])
                image_id, values = _parse_features(feat_line, self._feat.path, feat_row)
                if image_id != pred.image_id:
                    raise VinvlError(f"{self._feat.path}: line {feat_row + 1}: expected image "
                                     f"{pred.image_id!r} there, found {image_id!r} (the file changed "
                                     f"while read, or {self._feat.lineidx} does not match it)")
                yield self._emit(pred, pred_row, values, feat_row)
            # images only in features.tsv
            if feat_rows is not None:
                for feat_row, feat_line in feat_rows:
                    image_id = _first_column(feat_line).decode("utf-8", "replace")
                    self._missing_predictions(image_id, feat_row)
            else:
                for feat_row in (r for r, used in enumerate(consumed) if not used):
                    line = self._feat.read_at(feat_row, row_offsets[feat_row])
                    self._missing_predictions(_first_column(line).decode("utf-8", "replace"), feat_row)
        finally:
            if feat_rows is not None:
                feat_rows.close()
            self._feat.close()


def read_detections(
    features_tsv: str | os.PathLike,
    predictions_tsv: str | os.PathLike,
    *,
    min_confidence: float = 0.2,
    min_area_ratio: float = 0.01,
    max_regions: int | None = 100,
    missing: Literal["error", "skip"] = "error",
) -> DetectionReader:
    """Streams the images of a VinVL features.tsv / predictions.tsv pair, in predictions order.

    Per image, keeps the detections with conf >= min_confidence and box area / (W*H) >=
    min_area_ratio, then the max_regions most confident (stable; None = all); kept regions stay in
    the file's order, features aligned with their boxes. See `DetectionReader` for the order and
    `missing` handling and `ReadStats` for the counts in ``reader.stats``.
    """
    filters = _Filters(min_confidence, min_area_ratio, max_regions)
    return DetectionReader(features_tsv, predictions_tsv, filters, missing)


class DetectionTable:
    """Random access: image i = row i of predictions.tsv, found through predictions.lineidx.

    Its features row is taken at the same position of features.tsv when features.lineidx exists
    and the ids agree there; otherwise from an id index built once (from features.lineidx, or one
    scan of the first column). An image without features is a `VinvlError`.
    """

    def __init__(
        self,
        features_tsv: str | os.PathLike,
        predictions_tsv: str | os.PathLike,
        *,
        min_confidence: float = 0.2,
        min_area_ratio: float = 0.01,
        max_regions: int | None = 100,
    ):
        self._filters = _Filters(min_confidence, min_area_ratio, max_regions)
        self._feat = _Tsv(features_tsv)
        self._pred = _Tsv(predictions_tsv)
        offsets = self._pred.offsets()
        if offsets is None:
            raise VinvlError(f"{self._pred.path}: random access needs {self._pred.lineidx} "
                             "(byte offset of each row); stream the file with read_detections instead")
        self._pred_offsets = offsets

    def __len__(self) -> int:
        return len(self._pred_offsets)

    def __getitem__(self, i: int) -> ImageDetections:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"image {i} out of range for {n} images")
        i %= n
        pred = _parse_predictions(self._pred.read_at(i, self._pred_offsets[i]), self._pred.path, i)
        feat_offsets = self._feat.offsets()
        if feat_offsets is not None and i < len(feat_offsets):
            line = self._feat.read_at(i, feat_offsets[i])
            if _first_column(line).decode("utf-8", "replace") == pred.image_id:
                _, values = _parse_features(line, self._feat.path, i)
                return _combine(pred, self._pred.path, i, values, self._feat.path, i, self._filters)
        index, row_offsets = self._feat.index()
        row = index.get(pred.image_id)
        if row is None:
            raise VinvlError(f"{self._pred.path}: line {i + 1}: image {pred.image_id!r} has no row "
                             f"in {self._feat.path}")
        image_id, values = _parse_features(self._feat.read_at(row, row_offsets[row]), self._feat.path, row)
        if image_id != pred.image_id:
            raise VinvlError(f"{self._feat.path}: line {row + 1}: expected image {pred.image_id!r} "
                             f"there, found {image_id!r}")
        return _combine(pred, self._pred.path, i, values, self._feat.path, row, self._filters)

    def close(self) -> None:
        self._feat.close()
        self._pred.close()

    def __enter__(self) -> "DetectionTable":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# writers (the exact formats above; used by tests and to export detections)


def _write_tsv(path: str | os.PathLike, rows: Iterable[Sequence[str]], lineidx: bool) -> int:
    """Writes rows (and the .lineidx of their byte offsets); returns the number of rows.

    Without lineidx, an existing .lineidx is removed: it indexed the file being replaced.
    """
    path = Path(path)
    if not lineidx:
        lineidx_path(path).unlink(missing_ok=True)
    n = offset = 0
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(open(path, "wb"))
        fi = stack.enter_context(open(lineidx_path(path), "wb")) if lineidx else None
        for cols in rows:
            if any(("\t" in c or "\n" in c or "\r" in c) for c in cols):
                raise VinvlError(f"{path}: row {n + 1}: a column contains a tab or newline: {cols[0][:80]!r}")
            data = ("\t".join(cols) + "\n").encode("utf-8")
            f.write(data)
            if fi is not None:
                fi.write(b"%d\n" % offset)
            offset += len(data)
            n += 1
    return n


def _feature_rows(images: Iterable[ImageDetections]) -> Iterator[tuple[str, str, str]]:
    for im in images:
        values = np.asarray(im.features, dtype="<f4")
        if values.ndim != 2 or values.shape[1] != FEATURE_DIM:
            raise ValueError(f"image {im.image_id!r}: features shape {values.shape}, expected [n, {FEATURE_DIM}]")
        if im.feature_boxes is not None:
            fb = np.asarray(im.feature_boxes, dtype="<f4")
            if fb.shape != (values.shape[0], BOX_DIM):
                raise ValueError(f"image {im.image_id!r}: feature_boxes shape {fb.shape}, "
                                 f"expected [{values.shape[0]}, {BOX_DIM}]")
            values = np.concatenate([values, fb], axis=1)
        payload = base64.b64encode(np.ascontiguousarray(values).tobytes()).decode("ascii")
        yield im.image_id, str(values.shape[0]), payload


def _prediction_rows(images: Iterable[ImageDetections]) -> Iterator[tuple[str, str]]:
    for im in images:
        n = len(im.classes)
        if np.shape(im.boxes) != (n, 4) or np.shape(im.confidences) != (n,) or len(im.attributes) not in (0, n):
            raise ValueError(f"image {im.image_id!r}: boxes, classes, confidences and attributes disagree on n")
        with_attrs = any(im.attributes)
        objects = []
        for k in range(n):
            o: dict[str, Any] = {"rect": [float(v) for v in im.boxes[k]], "class": im.classes[k],
                                 "conf": float(im.confidences[k])}
            if with_attrs:
                o["attributes"] = list(im.attributes[k])
            objects.append(o)
        obj = {"image_h": int(im.image_h), "image_w": int(im.image_w), "objects": objects}
        yield im.image_id, json.dumps(obj)


def write_features(path: str | os.PathLike, images: Iterable[ImageDetections], *, lineidx: bool = True) -> int:
    """features.tsv rows; D = 2054 for an image whose `feature_boxes` is set, else 2048."""
    return _write_tsv(path, _feature_rows(images), lineidx)


def write_predictions(path: str | os.PathLike, images: Iterable[ImageDetections], *, lineidx: bool = True) -> int:
    """predictions.tsv rows ("attributes" written only for an image with some)."""
    return _write_tsv(path, _prediction_rows(images), lineidx)


def write_detections(features_tsv: str | os.PathLike, predictions_tsv: str | os.PathLike,
                     images: Sequence[ImageDetections], *, lineidx: bool = True) -> None:
    """Both files, same image order (each with its .lineidx unless lineidx=False)."""
    write_features(features_tsv, images, lineidx=lineidx)
    write_predictions(predictions_tsv, images, lineidx=lineidx)
