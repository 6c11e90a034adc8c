"""The procedural world (vlcore.world): taxonomy, scenes, rendering, captions, the TFDS builder, show.

Fast: the `tiny` config (~100 examples per split) and direct calls of the scene functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vlcore.world import examples as E
from vlcore.world import render as R
from vlcore.world import scenes as S
from vlcore.world import taxonomy as T

REPO = Path(__file__).resolve().parents[1]


# --- helpers -----------------------------------------------------------------------------------


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z][a-z\-]*", text.lower())


def _scenes(kind: str, n: int, seed: int = 7, **kw) -> list[tuple[S.Scene, np.random.Generator]]:
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        out.append((S.sample_scene(rng, kind, **kw), rng))
    return out


def _load_all(b) -> dict[str, list[dict]]:
    import tensorflow_datasets as tfds

    out = {}
    for split in b.info.splits:
        ds = b.as_dataset(split=split, shuffle_files=False)
        out[split] = sorted(tfds.as_numpy(ds), key=lambda ex: int(ex["image_id"]))
    return out


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _shard_digests(b) -> dict[str, str]:
    d = Path(b.data_dir)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.tfrecord*"))}


# --- fixtures: three tiny builds (seed 0 twice, seed 1 once) ----------------------------------


@pytest.fixture(scope="module")
def B():
    from vlcore.world import builder

    return builder


@pytest.fixture(scope="module")
def tiny(B, tmp_path_factory):
    b = B.prepare(tmp_path_factory.mktemp("world_a"), "tiny")
    return b, _load_all(b)


@pytest.fixture(scope="module")
def tiny_again(B, tmp_path_factory):
    """The same world through plain TFDS calls (registration by importing the builder module)."""
    import tensorflow_datasets as tfds

    b = tfds.builder("vl_world/tiny", data_dir=str(tmp_path_factory.mktemp("world_b")))
    b.download_and_prepare()  # no network: nothing to download
    return b, _load_all(b)


@pytest.fixture(scope="module")
def tiny_seed1(B, tmp_path_factory):
    b = B.prepare(tmp_path_factory.mktemp("world_c"), "tiny", seed=1)
    return b, _load_all(b)


# --- taxonomy ---------------------------------------------------------------------------------


def test_taxonomy_structure():
    assert len(T.coarse_names()) == 6 and len(T.fine_names()) == 30
    f2c = T.fine_to_coarse
    assert f2c.shape == (30,) and f2c.dtype == np.int32
    assert np.array_equal(np.bincount(f2c), [5] * 6)
    for s in T.SUBTYPES:
        assert f2c[s.index] == s.coarse and T.FINE_NAMES[s.index] == s.name
        assert s.pattern in T.PATTERNS and s.colour in T.COLOURS
    assert len(set(T.SHAPES)) == 6
    for c in range(6):
        subs = [s for s in T.SUBTYPES if s.coarse == c]
        combos = {(s.pattern, s.colour) for s in subs}
        assert len(combos) == 5, f"coarse {c}: subtypes not distinguishable"
        # fine-grained: most subtypes share their pattern or their colour with a sibling
        shared = sum(
            any(o is not s and (o.pattern == s.pattern or o.colour == s.colour) for o in subs) for s in subs
        )
        assert shared == 5


def test_fine_names_are_opaque():
    names = T.fine_names()
    assert len(set(names)) == 30
    assert all(re.fullmatch(r"[a-z]{6,7}", n) for n in names)

    def tri(w):
        return {w[i : i + 3] for i in range(len(w) - 2)}

    for a, b in itertools.combinations(names, 2):
        assert not tri(a) & tri(b), (a, b)
    vocab = set()
    for w in T.caption_vocabulary():
        vocab |= tri(w.replace("-", ""))
    for n in names:
        assert not tri(n) & vocab, n
        assert n not in T.attribute_words()


def test_class_prompts():
    fine = T.class_prompts("fine")
    coarse = T.class_prompts("coarse")
    k = len(T.CLASSIFICATION_TEMPLATES)
    assert len(fine) == 30 and all(len(p) == k for p in fine)
    assert len(coarse) == 6 and all(len(p) == k for p in coarse)
    assert fine[0][0] == "a photo of a zorblat, a type of fish."
    assert T.class_prompts("fine", with_coarse=False)[1][0] == "a photo of a quenvik."
    assert coarse[5][1] == "a picture of a flower."
    with pytest.raises(ValueError):
        T.class_prompts("medium")


# --- scenes and rendering -----------------------------------------------------------------------


def test_sample_scene_is_deterministic_and_seed_dependent():
    a = S.sample_scene(np.random.default_rng(3), "web")
    b = S.sample_scene(np.random.default_rng(3), "web")
    c = S.sample_scene(np.random.default_rng(4), "web")
    assert a == b and np.array_equal(R.render(a), R.render(b))
    assert a != c and not np.array_equal(R.render(a), R.render(c))


def test_boxes_are_tight_around_drawn_pixels():
    checked = 0
    for kind in ("web", "test"):
        for scene, _ in _scenes(kind, 120):
            for obj in scene.objects:
                alone = dataclasses.replace(scene, objects=(obj,))
                img = R.render(alone, noise=False).astype(int)
                drawn = np.any(img != np.asarray(scene.background_rgb), axis=-1)
                ys, xs = np.nonzero(drawn)
                y0, x0, y1, x1 = obj.box
                assert ys.min() == y0 and ys.max() == y1 - 1, (obj.box, ys.min(), ys.max())
                assert xs.min() == x0 and xs.max() == x1 - 1, (obj.box, xs.min(), xs.max())
                assert 0 <= y0 < y1 <= 64 and 0 <= x0 < x1 <= 64
                checked += 1
    assert checked > 300


def test_objects_sizes_counts_and_main_is_largest():
    counts = Counter()
    extents = []
    for kind in ("web", "memory", "test"):
        for scene, _ in _scenes(kind, 300):
            areas = [o.area for o in scene.objects]
            assert all(areas[0] > a for a in areas[1:]), areas
            if kind == "test":  # clearly dominant
                assert all(areas[0] >= 1.5 * a for a in areas[1:]), areas
                assert len(scene.objects) <= 3
            counts[(kind, len(scene.objects))] += 1
            extents += [max(o.box[2] - o.box[0], o.box[3] - o.box[1]) for o in scene.objects]
    assert all(counts[("web", n)] > 0 for n in (1, 2, 3, 4))
    assert counts[("test", 1)] > 100
    assert 11 <= min(extents) and max(extents) <= 34


def test_objects_can_be_told_apart_by_colour():
    """Jittered colours stay nearest to their own palette colour (colour names stay right)."""
    pal = np.array([T.COLOUR_RGB[c] for c in T.COLOURS], float)
    for scene, _ in _scenes("web", 200):
        for o in scene.objects:
            nearest = T.COLOURS[int(np.argmin(((pal - np.asarray(o.rgb)) ** 2).sum(1)))]
            assert nearest == o.colour
            assert o.colour == T.SUBTYPES[o.fine].colour and o.pattern == T.SUBTYPES[o.fine].pattern


def test_relations_follow_box_centres():
    n_rel = 0
    for scene, _ in _scenes("web", 200):
        for i, pred, j in S.scene_graph(scene):
            assert i < j and pred in S.RELATIONS
            (yi, xi), (yj, xj) = scene.objects[i].centre, scene.objects[j].centre
            dy, dx = yj - yi, xj - xi
            expected = ("left of" if dx > 0 else "right of") if abs(dx) >= abs(dy) else ("above" if dy > 0 else "below")
            assert pred == expected
            n_rel += 1
    assert n_rel > 100


def test_detector_tags_are_noisy_but_mostly_right():
    correct = total = extra = 0
    conf_right, conf_wrong = [], []
    for scene, rng in _scenes("web", 1500):
        tags = S.detector_tags(scene, rng)
        assert [t.confidence for t in tags] == sorted((t.confidence for t in tags), reverse=True)
        assert all(0.0 <= t.confidence <= 1.0 and t.label in T.COARSE_NAMES for t in tags)
        extra += len(tags) - len(scene.objects)
        for o in scene.objects:
            # its tag: box within the jitter of the object's box
            mine = [t for t in tags if max(abs(a - b) for a, b in zip(t.box, o.box)) <= S.DETECTOR_BOX_JITTER]
            assert mine, "object without a tag"
            t = max(mine, key=lambda t: t.confidence)
            total += 1
            if t.label == o.coarse_name:
                correct += 1
                conf_right.append(t.confidence)
            else:
                conf_wrong.append(t.confidence)
    acc = correct / total
    assert 0.85 <= acc <= 0.95, acc  # ~10 % wrong by design
    assert np.mean(conf_wrong) < np.mean(conf_right) - 0.2
    assert 0.10 <= extra / 1500 <= 0.20  # spurious detections, ~15 % of images


def test_detector_tags_point_at_their_objects_and_attributes_are_noisy_but_mostly_right():
    colour_right = pattern_right = total = spurious = 0
    for scene, rng in _scenes("web", 1500):
        tags = S.detector_tags(scene, rng)
        attributes = S.detector_attributes(scene, tags, np.random.default_rng(total))
        assert len(attributes) == len(tags)
        assert sorted(t.object_index for t in tags if t.object_index >= 0) == list(range(len(scene.objects)))
        for tag, words in zip(tags, attributes):
            if tag.object_index < 0:
                spurious += 1
                continue
            obj = scene.objects[tag.object_index]
            assert max(abs(a - b) for a, b in zip(tag.box, obj.box)) <= S.DETECTOR_BOX_JITTER
            total += 1
            colour_right += obj.colour in words.split()
            pattern_right += any(words.endswith(adj) for adj in T.PATTERN_ADJECTIVES[obj.pattern])
    # right with p=0.8 (or by chance) and kept with p=0.85: about 0.7 of the tags name each
    expected = (S.ATTRIBUTE_RIGHT_PROB + (1 - S.ATTRIBUTE_RIGHT_PROB) / 6) * (1 - S.ATTRIBUTE_DROP_PROB)
    assert abs(colour_right / total - expected) < 0.03, colour_right / total
    assert abs(pattern_right / total - expected) < 0.05, pattern_right / total
    assert spurious > 100


def test_attribute_words_leave_every_other_field_of_an_example_as_it_was():
    import vlcore.world.examples as E

    for split, index in (("web", 3), ("memory", 11), ("test", 5)):
        ex = E.make_example(0, split, index)
        scene, rng = E.scene_for(0, split, index)
        if split in E.MEMORY_STYLE_SPLITS:
            S.memory_caption(scene, rng)
        else:
            S.web_caption(scene, rng)
        tags = S.detector_tags(scene, rng)  # the main stream, untouched by the attribute head
        assert ex["tags"]["label"] == [t.label for t in tags]
        np.testing.assert_array_equal(ex["tags"]["confidence"], np.asarray([t.confidence for t in tags], np.float32))
        assert len(ex["tags"]["attributes"]) == len(tags)


def test_web_captions_rarely_name_the_fine_class():
    singles = _scenes("web", 4000, n_objects=1)

    def rate(p):
        return np.mean([s.main.fine_name in S.web_caption(s, rng, p) for s, rng in singles])

    r = rate(0.03)
    assert 0.015 <= r <= 0.05, r
    assert rate(0.0) == 0.0 and rate(1.0) == 1.0


def test_web_captions_mention_a_present_coarse_class():
    plural = dict(zip(T.COARSE_PLURALS, T.COARSE_NAMES))
    for scene, rng in _scenes("web", 500):
        cap = S.web_caption(scene, rng)
        present = {o.coarse_name for o in scene.objects}
        mentioned = {plural.get(w, w) for w in _tokens(cap)} & set(T.COARSE_NAMES)
        assert mentioned and mentioned <= present, (cap, present)


def test_memory_captions_name_the_main_object():
    for scene, rng in _scenes("memory", 500):
        cap = S.memory_caption(scene, rng)
        toks = _tokens(cap)
        assert scene.main.fine_name in toks and scene.main.coarse_name in toks, cap
        others = {o.fine_name for o in scene.objects[1:]} - {scene.main.fine_name}
        assert not others & set(toks), cap
        # ... but never how it looks: the look is only in the image (the main object's colour
        # and pattern words appear only when another object has them too)
        described = {o.colour for o in scene.objects[1:]} | set().union(
            *(S.PATTERN_ADJECTIVES[o.pattern] for o in scene.objects[1:]))
        look = {scene.main.colour, *S.PATTERN_ADJECTIVES[scene.main.pattern]} - described
        assert not look & set(toks), cap


def test_distractor_sentences_are_outside_the_world():
    vocab = T.attribute_words() | set(T.FINE_NAMES)
    sents = {S.distractor_sentence(np.random.default_rng(i)) for i in range(500)}
    assert len(sents) > 100
    for s in sents:
        assert not set(_tokens(s)) & vocab, s


def test_png_encoder_round_trips():
    from PIL import Image
    import io

    img = R.render(S.sample_scene(np.random.default_rng(0), "web"))
    png = E.encode_png(img)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), img)


def test_label_plan_balanced_and_per_split():
    for split in ("memory", "test"):
        plan = E.label_plan(0, split, 3000)
        assert np.array_equal(np.bincount(plan, minlength=30), [100] * 30)
        assert not np.array_equal(plan[:100], np.arange(100) % 30)  # shuffled
    plan = E.label_plan(0, "fusion_train", 1800)
    expected = np.zeros(30, np.int64)
    expected[list(T.FUSION_TRAIN_CLASSES)] = 100
    assert len(T.FUSION_TRAIN_CLASSES) == 18 and np.array_equal(np.bincount(plan, minlength=30), expected)
    assert np.array_equal(E.label_plan(0, "memory", 90), E.label_plan(0, "memory", 90))
    assert not np.array_equal(E.label_plan(0, "memory", 90), E.label_plan(1, "memory", 90))
    assert (E.label_plan(0, "web", 10) == -1).all()


def test_parallel_generation_matches_serial():
    serial = list(E.generate(5, "web", 40, workers=1))
    parallel = list(E.generate(5, "web", 40, workers=2, min_parallel=0))
    assert [i for i, _ in parallel] == list(range(40))
    for (_, a), (_, b) in zip(serial, parallel):
        assert a["image"] == b["image"] and a["caption"] == b["caption"]
        assert np.array_equal(a["objects"]["bbox"], b["objects"]["bbox"])
    # abandoning the generator early ends its workers (no hang)
    gen = E.generate(5, "web", 4000, workers=2, min_parallel=0)
    first = next(gen)
    gen.close()
    assert first[0] == 0 and first[1]["image"] == serial[0][1]["image"]


def test_text_corpus_examples_direct():
    exs = [E.make_example(0, "text_corpus", i) for i in range(2000)]
    coarse = set(T.COARSE_NAMES) | set(T.COARSE_PLURALS)
    distract = np.mean([not set(_tokens(e["caption"])) & coarse for e in exs])
    assert 0.26 <= distract <= 0.34, distract


# --- the TFDS builder -----------------------------------------------------------------------------


def test_split_sizes_equal_the_config(B, tiny):
    b, data = tiny
    sizes = B.TINY.split_sizes()
    assert set(b.info.splits) == set(B.SPLITS)
    for split, n in sizes.items():
        assert b.info.splits[split].num_examples == n == len(data[split])
        ids = [int(ex["image_id"]) for ex in data[split]]
        assert ids == [E.SPLIT_INDEX[split] * E.ID_STRIDE + i for i in range(n)]
    assert B.DEFAULT.web == 2 * B.QUICK.web and B.DEFAULT.test == 2 * B.QUICK.test


def test_builds_are_deterministic(tiny, tiny_again, tiny_seed1):
    (ba, a), (bb, b), (bc, c) = tiny, tiny_again, tiny_seed1
    assert ba.data_dir != bb.data_dir
    digests = _shard_digests(ba)
    assert digests and digests == _shard_digests(bb)  # byte-identical shards
    for split in a:
        for x, y in zip(a[split], b[split]):
            assert np.array_equal(x["image"], y["image"]) and x["caption"] == y["caption"]
            for key in ("objects", "tags", "relations"):
                for f in x[key]:
                    assert np.array_equal(x[key][f], y[key][f]), (split, key, f)
    assert "seed1" in bc.builder_config.name
    diff = sum(not np.array_equal(x["image"], y["image"]) for x, y in zip(a["web"], c["web"]))
    assert diff == len(a["web"])
    assert [x["caption"] for x in a["memory"]] != [x["caption"] for x in c["memory"]]


def test_images_are_the_rendered_scenes(tiny):
    b, data = tiny
    for split in ("web", "test"):
        for ex in data[split][:10]:
            i = int(ex["image_id"]) % E.ID_STRIDE
            scene, _ = E.scene_for(0, split, i, int(E.label_plan(0, split, len(data[split]))[i]))
            assert np.array_equal(ex["image"], R.render(scene))
            assert int(ex["fine_label"]) == scene.main.fine


def test_declared_features_shapes_and_dtypes(B, tiny):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    b, _ = tiny
    ds = tfds.load("vl_world/tiny", data_dir=b.data_dir.split("/vl_world/")[0], split="web")
    spec = ds.element_spec
    assert spec["image"].shape == (64, 64, 3) and spec["image"].dtype == tf.uint8
    assert spec["image_id"].dtype == tf.int64 and spec["caption"].dtype == tf.string
    assert spec["fine_label"].dtype == tf.int64 and spec["coarse_label"].dtype == tf.int64
    assert spec["objects"]["bbox"].shape.as_list() == [None, 4] and spec["objects"]["bbox"].dtype == tf.float32
    assert spec["objects"]["colour"].dtype == tf.string and spec["objects"]["pattern"].dtype == tf.string
    assert spec["objects"]["fine_label"].dtype == tf.int64
    assert spec["relations"]["subject"].dtype == tf.int32 and spec["relations"]["object"].dtype == tf.int32
    assert spec["relations"]["predicate"].dtype == tf.string
    assert spec["tags"]["bbox"].shape.as_list() == [None, 4] and spec["tags"]["confidence"].dtype == tf.float32
    assert spec["tags"]["label"].dtype == tf.string
    feats = b.info.features
    assert feats["fine_label"].names == T.fine_names() and feats["coarse_label"].names == T.coarse_names()
    assert feats["objects"]["fine_label"].names == T.fine_names()
    ex = next(iter(tfds.as_numpy(ds)))
    assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
    assert ex["image"].std() > 5  # an actual picture


def test_examples_are_consistent(tiny):
    _, data = tiny
    f2c = T.fine_to_coarse
    for split in ("web", "memory", "fusion_train", "test"):
        for ex in data[split]:
            o = ex["objects"]
            n = len(o["fine_label"])
            assert 1 <= n <= 4 and o["bbox"].shape == (n, 4)
            assert int(ex["fine_label"]) == o["fine_label"][0] and int(ex["coarse_label"]) == o["coarse_label"][0]
            assert np.array_equal(o["coarse_label"], f2c[o["fine_label"]])
            for fl, col, pat in zip(o["fine_label"], o["colour"], o["pattern"]):
                assert (_text(col), _text(pat)) == (T.SUBTYPES[fl].colour, T.SUBTYPES[fl].pattern)
            bb = o["bbox"]
            assert (bb[:, 0] < bb[:, 2]).all() and (bb[:, 1] < bb[:, 3]).all()
            areas = (bb[:, 2] - bb[:, 0]) * (bb[:, 3] - bb[:, 1])
            assert (areas[0] > areas[1:]).all()  # main object is the largest
            # relations agree with box centres
            cy, cx = (bb[:, 0] + bb[:, 2]) / 2, (bb[:, 1] + bb[:, 3]) / 2
            r = ex["relations"]
            for i, p, j in zip(r["subject"], r["predicate"], r["object"]):
                p = _text(p)
                if p in ("left of", "right of"):
                    assert (cx[j] > cx[i]) == (p == "left of")
                else:
                    assert (cy[j] > cy[i]) == (p == "above")
            t = ex["tags"]
            assert len(t["label"]) >= n and ((t["confidence"] >= 0) & (t["confidence"] <= 1)).all()
            assert ((t["bbox"] >= 0) & (t["bbox"] <= 1)).all()


def test_fine_classes_balanced_in_test_and_memory(tiny):
    _, data = tiny
    for split in ("test", "memory"):
        counts = np.bincount([int(ex["fine_label"]) for ex in data[split]], minlength=30)
        assert counts.max() - counts.min() <= 1, (split, counts)


def test_captions_by_split(tiny):
    _, data = tiny
    fine = T.fine_names()
    coarse_words = set(T.COARSE_NAMES) | set(T.COARSE_PLURALS)
    for split in ("memory", "fusion_train", "test"):
        for ex in data[split]:
            toks = _tokens(_text(ex["caption"]))
            assert fine[int(ex["fine_label"])] in toks and T.COARSE_NAMES[int(ex["coarse_label"])] in toks
    # fusion_train shows only its 18 classes; the 12 novel ones are in the memory and the test split
    assert {int(ex["fine_label"]) for ex in data["fusion_train"]} == set(T.FUSION_TRAIN_CLASSES)
    assert {int(ex["fine_label"]) for ex in data["memory"]} == set(range(T.NUM_FINE))
    web = [_tokens(_text(ex["caption"])) for ex in data["web"]]
    assert all(set(t) & coarse_words for t in web)
    named = np.mean([bool(set(t) & set(fine)) for t in web])
    assert named < 0.2, named  # names are rare in web captions


def test_text_corpus_split(tiny):
    _, data = tiny
    corpus = [_text(ex["caption"]) for ex in data["text_corpus"]]
    test_caps = {_text(ex["caption"]) for ex in data["test"]}
    assert not set(corpus) & test_caps
    coarse_words = set(T.COARSE_NAMES) | set(T.COARSE_PLURALS)
    distractors = [s for s in corpus if not set(_tokens(s)) & coarse_words]
    assert 0.12 <= len(distractors) / len(corpus) <= 0.5
    for ex in data["text_corpus"]:
        assert int(ex["fine_label"]) == -1 and int(ex["coarse_label"]) == -1
        assert (ex["image"] == 0).all() and len(ex["objects"]["fine_label"]) == 0
        assert len(ex["tags"]["label"]) == 0 and len(ex["relations"]["subject"]) == 0


def test_custom_seed_configs_and_bad_config(B, tmp_path):
    assert B.config_for("quick") == "quick" and B.config_for("quick", 0) == "quick"
    cfg = B.config_for("quick", 3)
    assert cfg.name == "quick_seed3" and cfg.seed == 3 and cfg.web == B.QUICK.web
    with pytest.raises(ValueError, match="unknown vl_world config"):
        B.config_for("huge")


# --- show -----------------------------------------------------------------------------------------


def test_show_writes_a_png_grid(tiny, tmp_path):
    from PIL import Image

    from vlcore.world import show

    b, _ = tiny
    data_dir = b.data_dir.split("/vl_world/")[0]
    out = tmp_path / "grid.png"
    rc = show.main(["--data_dir", data_dir, "--config", "tiny", "--split", "test", "--n", "6", "--cols", "3",
                    "--out", str(out)])
    assert rc == 0
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == show.grid_size(6, 3) == (3 * show.CELL_W_PX, 2 * show.CELL_H_PX)
        assert np.asarray(im.convert("L")).std() > 10
    assert not [p for p in tmp_path.iterdir() if p.name != "grid.png"]  # no temp file left


def test_show_rejects_bad_arguments(tiny, tmp_path, capsys):
    from vlcore.world import show

    b, _ = tiny
    data_dir = b.data_dir.split("/vl_world/")[0]
    assert show.main(["--data_dir", data_dir, "--config", "huge", "--out", str(tmp_path / "a.png")]) == 2
    assert "unknown vl_world config" in capsys.readouterr().err
    assert show.main(["--data_dir", data_dir, "--config", "tiny", "--out", str(tmp_path / "no" / "a.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert show.main(["--data_dir", str(tmp_path), "--config", "tiny", "--out", str(tmp_path / "a.png")]) == 2
    assert "no prepared vl_world/tiny" in capsys.readouterr().err
    # a real process: exit status and message for an unknown split
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "vlcore.world.show", "--data_dir", data_dir, "--config", "tiny", "--split",
         "validation", "--out", str(tmp_path / "b.png")],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120,
    )
    assert proc.returncode != 0
    assert "unknown split 'validation'" in proc.stderr
    assert not (tmp_path / "b.png").exists()
