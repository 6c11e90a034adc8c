"""jaxmuvla.vinvl: VinVL features.tsv / predictions.tsv written in the real format and read back."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from jaxmuvla.vinvl import (
    FEATURE_DIM,
    DetectionTable,
    ImageDetections,
    VinvlError,
    box5,
    lineidx_path,
    read_detections,
    write_detections,
    write_features,
    write_predictions,
)

NO_FILTER = dict(min_confidence=0.0, min_area_ratio=0.0, max_regions=None)


def make_image(image_id: str, n: int, seed: int, *, box_cols: bool = False, attrs: bool = True,
               w: int = 640, h: int = 480) -> ImageDetections:
    """n regions whose feature row k holds (image seed, k) in its first two columns."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, FEATURE_DIM)).astype(np.float32)
    feats[:, 0] = seed
    feats[:, 1] = np.arange(n)
    x1 = rng.uniform(0, w / 2, n)
    y1 = rng.uniform(0, h / 2, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(w / 8, w / 2, n), y1 + rng.uniform(h / 8, h / 2, n)], 1)
    boxes = boxes.astype(np.float32)
    fb = rng.uniform(0, 1, (n, 6)).astype(np.float32) if box_cols else None
    return ImageDetections(
        image_id=image_id, image_h=h, image_w=w, features=feats, boxes=boxes,
        classes=tuple(f"cls{seed}_{k}" for k in range(n)),
        confidences=rng.uniform(0.5, 1.0, n).astype(np.float32),
        attributes=tuple((f"a{k}", "red") if attrs and k % 2 else () for k in range(n)),
        feature_boxes=fb,
    )


def assert_same(a: ImageDetections, b: ImageDetections) -> None:
    assert (a.image_id, a.image_h, a.image_w) == (b.image_id, b.image_h, b.image_w)
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.confidences, b.confidences)
    assert a.classes == b.classes
    assert a.attributes == b.attributes
    if a.feature_boxes is None:
        assert b.feature_boxes is None
    else:
        np.testing.assert_array_equal(a.feature_boxes, b.feature_boxes)
    assert b.features.dtype == np.float32 and b.features.shape == (len(b.classes), FEATURE_DIM)


def files(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "features.tsv", tmp_path / "predictions.tsv"


@pytest.mark.parametrize("box_cols", [False, True], ids=["D2048", "D2054"])
@pytest.mark.parametrize("lineidx", [False, True], ids=["scan", "lineidx"])
@pytest.mark.parametrize("order", ["same", "shuffled"])
def test_round_trip(tmp_path, box_cols, lineidx, order):
    images = [make_image(f"img{i}", n, i, box_cols=box_cols, attrs=i != 2)
              for i, n in enumerate([3, 1, 4, 0, 2])]
    feat, pred = files(tmp_path)
    write_predictions(pred, images, lineidx=lineidx)
    feat_order = images if order == "same" else [images[i] for i in (3, 0, 4, 2, 1)]
    write_features(feat, feat_order, lineidx=lineidx)
    assert lineidx_path(feat).is_file() == lineidx

    reader = read_detections(feat, pred, **NO_FILTER)
    got = list(reader)
    assert [g.image_id for g in got] == [im.image_id for im in images]  # predictions order
    for a, b in zip(images, got):
        assert_same(a, b)
    assert reader.stats.images == 5 and reader.stats.regions_kept == 10
    assert reader.stats.seeked == (order != "same")
    assert (reader.stats.missing_features, reader.stats.missing_predictions) == (0, 0)
    if box_cols:  # the 6 appended columns are split off, the 2048 features are what was written
        assert got[0].feature_boxes.shape == (3, 6)

    if lineidx:  # random access by position
        with DetectionTable(feat, pred, **NO_FILTER) as table:
            assert len(table) == 5
            for i in (4, 0, 2, -1):
                assert_same(images[i], table[i])


def test_real_bytes(tmp_path):
    """The files are exactly VinVL's layout: check one row of each by hand."""
    im = make_image("coco_42", 2, 7, box_cols=True)
    feat, pred = files(tmp_path)
    write_detections(feat, pred, [im, make_image("coco_43", 1, 8, box_cols=True)])
    rows = feat.read_bytes().split(b"\n")
    image_id, num, payload = rows[0].split(b"\t")
    assert (image_id, num) == (b"coco_42", b"2")
    values = np.frombuffer(base64.b64decode(payload), np.float32).reshape(2, 2054)
    np.testing.assert_array_equal(values[:, :2048], im.features)
    np.testing.assert_array_equal(values[:, 2048:], im.feature_boxes)
    image_id, text = pred.read_text().split("\n")[0].split("\t")
    obj = json.loads(text)
    assert obj["image_h"] == 480 and obj["image_w"] == 640 and len(obj["objects"]) == 2
    assert set(obj["objects"][1]) == {"rect", "class", "conf", "attributes"}
    assert lineidx_path(feat).read_text() == f"0\n{len(rows[0]) + 1}\n"


def test_json_features_variant(tmp_path):
    """VinVL's captioning features: image_id \\t {"num_boxes": n, "features": base64}."""
    im = make_image("x", 2, 3, box_cols=True)
    feat, pred = files(tmp_path)
    write_predictions(pred, [im])
    values = np.concatenate([im.features, im.feature_boxes], 1)
    cell = json.dumps({"num_boxes": 2, "features": base64.b64encode(values.tobytes()).decode()})
    feat.write_text(f"x\t{cell}\n")
    assert_same(im, next(read_detections(feat, pred, **NO_FILTER)))


def test_filters(tmp_path):
    w, h = 100, 100
    boxes = np.array([
        [0, 0, 50, 50],  # 0 conf 0.9
        [0, 0, 50, 50],  # 1 conf 0.1: below min_confidence
        [0, 0, 5, 5],  # 2 conf 0.95: area ratio 0.0025 < 0.01
        [10, 10, 20, 20],  # 3 conf 0.7: area ratio exactly 0.01, kept
        [0, 0, 30, 30],  # 4 conf 0.7 (tie with 3)
        [0, 0, 40, 40],  # 5 conf 0.2: exactly min_confidence, kept
        [0, 0, 60, 60],  # 6 conf 0.8
    ], np.float32)
    conf = np.array([0.9, 0.1, 0.95, 0.7, 0.7, 0.2, 0.8], np.float32)
    n = len(conf)
    feats = np.zeros((n, FEATURE_DIM), np.float32)
    feats[:, 0] = np.arange(n)  # each feature row names its detection
    im = ImageDetections("a", h, w, feats, boxes, tuple("abcdefg"), conf, ((),) * n)
    feat, pred = files(tmp_path)
    write_detections(feat, pred, [im])

    def kept(**kw):
        d = next(read_detections(feat, pred, **kw))
        rows = d.features[:, 0].astype(int).tolist()
        np.testing.assert_array_equal(d.boxes, boxes[rows])  # features stay aligned with boxes
        np.testing.assert_array_equal(d.confidences, conf[rows])
        assert d.classes == tuple("abcdefg"[r] for r in rows)
        return rows

    assert kept() == [0, 3, 4, 5, 6]  # defaults: conf >= 0.2, area ratio >= 0.01, <= 100
    assert kept(**NO_FILTER) == list(range(7))
    assert kept(min_confidence=0.75, min_area_ratio=0.0, max_regions=None) == [0, 2, 6]
    assert kept(min_confidence=0.0, min_area_ratio=0.2, max_regions=None) == [0, 1, 6]
    # top 4 by confidence: 0.95, 0.9, 0.8, then the first of the two 0.7s (stable); file order kept
    assert kept(min_confidence=0.0, min_area_ratio=0.0, max_regions=4) == [0, 2, 3, 6]
    assert kept(max_regions=3) == [0, 3, 6]
    with pytest.raises(VinvlError, match="max_regions"):
        read_detections(feat, pred, max_regions=0)
    with pytest.raises(VinvlError, match="missing"):
        read_detections(feat, pred, missing="ignore")


def test_streaming_does_not_read_ahead(tmp_path):
    """The first image comes out of files whose tail is garbage: nothing is read beyond it."""
    images = [make_image(f"img{i}", 30, i) for i in range(40)]
    feat, pred = files(tmp_path)
    write_detections(feat, pred, images, lineidx=False)
    with open(feat, "ab") as f:
        f.write(b"garbage\tnot a number\t!!!!\n" + b"\xff" * 1_000_000)
    with open(pred, "ab") as f:
        f.write(b"garbage\t{not json\n")
    reader = read_detections(feat, pred, **NO_FILTER)
    assert_same(images[0], next(reader))
    assert_same(images[1], next(reader))
    reader.close()
    with pytest.raises(VinvlError, match=r"predictions\.tsv: line 41 \(image 'garbage'\): bad JSON"):
        list(read_detections(feat, pred, **NO_FILTER))


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_base64_length(tmp_path):
    feat, pred = files(tmp_path)
    images = [make_image("a", 2, 0), make_image("b", 3, 1)]
    write_detections(feat, pred, images)
    lines = feat.read_text().split("\n")
    image_id, num, payload = lines[1].split("\t")
    short = base64.b64encode(base64.b64decode(payload)[:-8]).decode()
    lines[1] = "\t".join([image_id, num, short])
    feat.write_text("\n".join(lines))
    reader = read_detections(feat, pred, **NO_FILTER)
    assert next(reader).image_id == "a"
    with pytest.raises(VinvlError) as e:
        next(reader)
    msg = str(e.value)
    assert f"{feat}: line 2 (image 'b')" in msg
    assert "24568 bytes" in msg and "num_boxes (3)" in msg and "24576 or 24648" in msg

    lines[1] = "\t".join([image_id, num, "@@not base64@@"])
    feat.write_text("\n".join(lines))
    with pytest.raises(VinvlError, match=r"line 2 \(image 'b'\): the features column is not valid base64"):
        list(read_detections(feat, pred))


def test_num_boxes_disagrees_with_objects(tmp_path):
    feat, pred = files(tmp_path)
    a = make_image("a", 2, 0)
    write_features(feat, [a, make_image("b", 3, 1)])
    write_predictions(pred, [a, make_image("b", 4, 1)])
    with pytest.raises(VinvlError) as e:
        list(read_detections(feat, pred))
    msg = str(e.value)
    assert "image 'b'" in msg and f"{feat} line 2 has num_boxes 3" in msg and f"{pred} line 2 lists 4 objects" in msg


@pytest.mark.parametrize("lineidx", [False, True])
def test_image_in_one_file_only(tmp_path, lineidx):
    feat, pred = files(tmp_path)
    images = [make_image(x, 2, i) for i, x in enumerate("abcde")]
    write_predictions(pred, [images[i] for i in (0, 1, 2, 4)], lineidx=lineidx)  # no 'd'
    write_features(feat, [images[i] for i in (0, 2, 3, 4)], lineidx=lineidx)  # no 'b'
    with pytest.raises(VinvlError) as e:
        list(read_detections(feat, pred))
    assert str(e.value).startswith(f"{pred}: line 2: image 'b' has no row in {feat}")

    reader = read_detections(feat, pred, missing="skip")
    assert [d.image_id for d in reader] == ["a", "c", "e"]
    assert (reader.stats.missing_features, reader.stats.missing_predictions) == (1, 1)
    assert reader.stats.images == 3

    # same order, an extra image at the end of features.tsv: found once predictions are exhausted
    write_predictions(pred, images[:3], lineidx=lineidx)
    write_features(feat, images, lineidx=lineidx)
    with pytest.raises(VinvlError) as e:
        list(read_detections(feat, pred))
    assert str(e.value).startswith(f"{feat}: line 4: image 'd' has no row in {pred}")
    reader = read_detections(feat, pred, missing="skip")
    assert len(list(reader)) == 3 and reader.stats.missing_predictions == 2 and not reader.stats.seeked


@pytest.mark.parametrize("text, expect", [
    ('{"image_h": 480, "image_w": 640, "objects": [', "bad JSON"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"image_h": 480, "objects": []}', "missing field 'image_w'"),
    ('{"image_h": 480, "image_w": -3, "objects": []}', "field 'image_w' is -3, expected a positive integer"),
    ('{"image_h": 480, "image_w": 640, "objects": [{"rect": [0, 0, 1, 1], "class": "x"}]}',
     r"objects\[0\]: missing field 'conf'"),
    ('{"image_h": 480, "image_w": 640, "objects": [{"rect": [0, 0, 1], "class": "x", "conf": 1}]}',
     r"objects\[0\]: field 'rect' is \[0, 0, 1\]"),
])
def test_bad_predictions_row(tmp_path, text, expect):
    feat, pred = files(tmp_path)
    a = make_image("a", 1, 0)
    write_detections(feat, pred, [a])
    with open(pred, "a") as f:
        f.write(f"b\t{text}\n")
    with pytest.raises(VinvlError, match=rf"predictions\.tsv: line 2 \(image 'b'\): {expect}"):
        list(read_detections(feat, pred))


def test_bad_columns(tmp_path):
    feat, pred = files(tmp_path)
    write_detections(feat, pred, [make_image("a", 1, 0)])
    feat.write_text("a\t1\n")
    with pytest.raises(VinvlError, match=r"features\.tsv: line 1: expected 3 tab-separated columns"):
        list(read_detections(feat, pred))


def test_lineidx_pointing_mid_row(tmp_path):
    feat, pred = files(tmp_path)
    images = [make_image(x, 2, i) for i, x in enumerate("abc")]
    write_predictions(pred, images)
    write_features(feat, images[::-1])  # another order: features rows are found by offset
    idx = lineidx_path(feat)
    offsets = [int(x) for x in idx.read_text().split()]
    idx.write_text(f"{offsets[0]}\n{offsets[1] + 5}\n{offsets[2]}\n")
    with pytest.raises(VinvlError) as e:
        list(read_detections(feat, pred))
    assert str(e.value).startswith(f"{idx}: line 2 (byte {offsets[1] + 5}) is not the start of a row of {feat}")

    idx.write_text(f"{offsets[0]}\n{offsets[1]}\n")  # a lineidx of a shorter file
    with pytest.raises(VinvlError, match="does not match"):
        list(read_detections(feat, pred))
    idx.write_text("0\nabc\n")
    with pytest.raises(VinvlError, match=r"features\.lineidx: line 2 is b'abc"):
        list(read_detections(feat, pred))
    idx.unlink()  # without it: one scan of the ids, same result as the intact file
    assert [d.image_id for d in read_detections(feat, pred)] == ["a", "b", "c"]


def test_duplicate_ids(tmp_path):
    feat, pred = files(tmp_path)
    a, b = make_image("a", 1, 0), make_image("b", 1, 1)
    write_predictions(pred, [b, a])
    write_features(feat, [a, b, a])
    with pytest.raises(VinvlError, match=r"features\.tsv: line 3: image 'a' already has line 1"):
        list(read_detections(feat, pred))
    write_features(feat, [a, b])
    write_predictions(pred, [b, a, a])
    with pytest.raises(VinvlError, match=r"predictions\.tsv: line 3: image 'a' appears twice"):
        list(read_detections(feat, pred))


def test_table_needs_lineidx(tmp_path):
    feat, pred = files(tmp_path)
    write_detections(feat, pred, [make_image("a", 1, 0)])
    write_detections(feat, pred, [make_image("a", 1, 0)], lineidx=False)
    assert not lineidx_path(pred).exists()  # a stale .lineidx of a rewritten TSV is removed
    with pytest.raises(VinvlError, match="random access needs"):
        DetectionTable(feat, pred)
    with pytest.raises(VinvlError, match="no such file"):
        read_detections(tmp_path / "nope.tsv", pred)


def test_box5():
    boxes = np.array([[10, 20, 110, 70], [0, 0, 200, 100]], np.float32)
    got = box5(boxes, image_w=200, image_h=100)
    want = np.array([
        [10 / 200, 20 / 100, 110 / 200, 70 / 100, 100 * 50 / 20000],
        [0, 0, 1, 1, 1],
    ], np.float32)
    assert got.dtype == np.float32 and got.shape == (2, 5)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert box5(np.zeros((0, 4)), 3, 4).shape == (0, 5)


@pytest.mark.parametrize("lineidx", [False, True])
def test_reorder_with_tiny_scan_chunks_and_long_ids(tmp_path, monkeypatch, lineidx):
    """The id scan across chunk boundaries, and ids longer than one probe read at an offset."""
    import jaxmuvla.vinvl as vinvl

    monkeypatch.setattr(vinvl, "_SCAN_CHUNK", 7)
    monkeypatch.setattr(vinvl, "_ID_PROBE", 3)
    images = [make_image(f"image_{'x' * (i * 5)}_{i}", i % 3, i) for i in range(6)]
    feat, pred = files(tmp_path)
    write_predictions(pred, images, lineidx=lineidx)
    write_features(feat, images[::-1], lineidx=lineidx)
    got = list(read_detections(feat, pred, **NO_FILTER))
    assert len(got) == 6
    for a, b in zip(images, got):
        assert_same(a, b)
