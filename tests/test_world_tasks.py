"""The world's downstream tasks (vlcore.world.tasks, the `vl_world_tasks` builder, jaxmuvla.tasks.world).

Every label is recomputed here from the example's own `objects` (classes, colours, patterns,
boxes) by parsing its text; nothing expected is copied from the generator's output.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from vlcore.world import tasks as W
from vlcore.world.taxonomy import COARSE_NAMES, COARSE_PLURALS, COLOURS, PATTERN_ADJECTIVES

# --- independent readers of the texts ------------------------------------------------------------

PLURAL = dict(zip(COARSE_PLURALS, COARSE_NAMES))
ADJECTIVE_PATTERN = {adj: p for p, adjs in PATTERN_ADJECTIVES.items() for adj in adjs}
ANSWER_OF_PATTERN = {"plain": "plain", "horizontal stripes": "horizontal stripes",
                     "vertical stripes": "vertical stripes", "dots": "dots", "checker": "checkered",
                     "ring": "border", "half": "half dark"}
RELATION = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below"}
NUMBER = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five"))}
CLASS = "|".join(COARSE_NAMES)
COLOUR = "|".join(COLOURS)
ADJ = "|".join(sorted(ADJECTIVE_PATTERN, key=len, reverse=True))
REL = "|".join(RELATION)


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def objects(block: dict) -> list[dict]:
    o = block["objects"]
    boxes = np.asarray(o["bbox"], np.float64).reshape(-1, 4) * 64.0  # pixels (exact: /64 in float32)
    return [{"label": _s(l), "colour": _s(c), "pattern": _s(p), "box": b}
            for l, c, p, b in zip(o["label"], o["colour"], o["pattern"], boxes)]


def relation(a: dict, b: dict) -> str | None:
    """"a is <relation> b", by the box centres: the axis of the larger offset (x on ties)."""
    dy = (b["box"][0] + b["box"][2]) / 2 - (a["box"][0] + a["box"][2]) / 2
    dx = (b["box"][1] + b["box"][3]) / 2 - (a["box"][1] + a["box"][3]) / 2
    if max(abs(dx), abs(dy)) < 1:
        return None
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def having(objs, label=None, colour=None, pattern=None) -> list[dict]:
    return [o for o in objs if label in (None, o["label"]) and colour in (None, o["colour"])
            and pattern in (None, o["pattern"])]


def iou(a, b) -> float:
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ih * iw
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def vqa_truth(question: str, objs: list[dict]) -> tuple[str, str, str]:
    """(answer, question_type, answer_type) of a question about these objects."""
    if m := re.fullmatch(rf"what colou?r is the ({CLASS})\?", question):
        (o,) = having(objs, m[1])
        return o["colour"], "what color is the", "other"
    if m := re.fullmatch(rf"what pattern does the ({COLOUR}) ({CLASS}) have\?", question):
        (o,) = having(objs, m[2], m[1])
        return ANSWER_OF_PATTERN[o["pattern"]], "what pattern", "other"
    if m := re.fullmatch(rf"how many (\w+) are there\?", question):
        return str(len(having(objs, PLURAL[m[1]]))), "how many", "number"
    if m := re.fullmatch(rf"is there an? ({COLOUR}) ({CLASS})\?", question):
        return ("yes" if having(objs, m[2], m[1]) else "no"), "is there a", "yes/no"
    m = re.fullmatch(rf"what is ({REL}) the ({COLOUR}) ({CLASS})\?", question)
    assert m, question
    (x,) = having(objs, m[3], m[2])
    (y,) = [o for o in objs if o is not x and relation(o, x) == RELATION[m[1]]]
    return y["label"], "what is", "other"


def ve_truth(hypothesis: str, objs: list[dict]) -> tuple[bool, bool]:
    """(the visible statement holds, an unverifiable clause was added)."""
    clauses = "|".join(c for pair in W.UNVERIFIABLE_CLAUSES for c in pair)
    m = re.fullmatch(rf"(.*?)(?: ({clauses}))?", hypothesis)
    body, clause = m[1], m[2] is not None
    if m := re.fullmatch(rf"(?:there (?:is|are) )?exactly (\w+) (\w+)", body):
        n, noun = NUMBER[m[1]], m[2]
        return len(having(objs, PLURAL.get(noun, noun))) == n, clause
    if m := re.fullmatch(rf"(?:there is )?an? ({COLOUR}) ({CLASS})", body):
        return bool(having(objs, m[2], m[1])), clause
    if m := re.fullmatch(rf"(?:there is )?an? ({ADJ}) ({CLASS})", body):
        return bool(having(objs, m[2], pattern=ADJECTIVE_PATTERN[m[1]])), clause
    m = re.fullmatch(rf"an? ({COLOUR}) ({CLASS}) (?:is )?({REL}) an? ({CLASS})", body)
    assert m, hypothesis
    pairs = [(a, b) for a in having(objs, m[2], m[1]) for b in having(objs, m[4]) if a is not b]
    return any(relation(a, b) == RELATION[m[3]] for a, b in pairs), clause


def nlvr2_truth(sentence: str, left: list[dict], right: list[dict]) -> tuple[str, bool]:
    """(template, truth) of a statement about two images."""
    if m := re.fullmatch(rf"both images contain an? ({COLOUR}) ({CLASS})", sentence):
        return "both", bool(having(left, m[2], m[1])) and bool(having(right, m[2], m[1]))
    if m := re.fullmatch(rf"exactly one image contains an? ({CLASS})", sentence):
        return "one", bool(having(left, m[1])) != bool(having(right, m[1]))
    if m := re.fullmatch(r"the left image has more (\w+) than the right image", sentence):
        return "more", len(having(left, PLURAL[m[1]])) > len(having(right, PLURAL[m[1]]))
    if m := re.fullmatch(r"there are exactly (\w+) (\w+) in the two images together", sentence):
        c = PLURAL[m[2]]
        return "total", len(having(left, c)) + len(having(right, c)) == NUMBER[m[1]]
    if m := re.fullmatch(rf"the left image contains an? ({ADJ}) ({CLASS}) and the right image does not", sentence):
        p = ADJECTIVE_PATTERN[m[1]]
        return "pattern", bool(having(left, m[2], pattern=p)) and not having(right, m[2], pattern=p)
    m = re.fullmatch(rf"in the (left|right) image an? ({COLOUR}) ({CLASS}) is ({REL}) an? ({CLASS})", sentence)
    assert m, sentence
    objs = left if m[1] == "left" else right
    pairs = [(a, b) for a in having(objs, m[3], m[2]) for b in having(objs, m[5]) if a is not b]
    return "relation", any(relation(a, b) == RELATION[m[4]] for a, b in pairs)


def referents(sentence: str, objs: list[dict]) -> list[dict]:
    """The objects a referring expression fits."""
    noun = rf"the (?:({COLOUR}) )?(?:({ADJ}) )?({CLASS})"
    m = re.fullmatch(rf"{noun}(?: ({REL}) {noun})?", sentence)
    assert m, sentence

    def fit(colour, adj, label):
        return having(objs, label, colour, ADJECTIVE_PATTERN[adj] if adj else None)

    found = fit(m[1], m[2], m[3])
    if m[4]:
        (anchor,) = fit(m[5], m[6], m[7])
        found = [o for o in found if o is not anchor and relation(o, anchor) == RELATION[m[4]]]
    return found


def prior_accuracy(train: list[tuple[str, str]], test: list[tuple[str, str]]) -> float:
    """Accuracy on test of the most common train answer of each exact text (a text-only model)."""
    by_text = defaultdict(Counter)
    for text, answer in train:
        by_text[text][answer] += 1
    overall = Counter(a for _, a in train).most_common(1)[0][0]
    return float(np.mean([(by_text[t].most_common(1)[0][0] if t in by_text else overall) == a for t, a in test]))


# --- direct generation (pure numpy) ----------------------------------------------------------------


def generate(task: str, split: str, n: int, seed: int = 0) -> list[dict]:
    return [ex for _, ex in W.split_examples(seed, task, split, n)]


@pytest.fixture(scope="module")
def vqa():
    return {"train": generate("vqa", "train", 900), "val": generate("vqa", "val", 450)}


@pytest.fixture(scope="module")
def nlvr2():
    return {"train": generate("nlvr2", "train", 480), "dev": generate("nlvr2", "dev", 240)}


@pytest.fixture(scope="module")
def ve():
    return {"train": generate("ve", "train", 600), "dev": generate("ve", "dev", 300)}


@pytest.fixture(scope="module")
def refcoco():
    return {s: generate("refcoco", s, 300) for s in ("train", "testA", "testB")}


def test_vqa_answers_follow_from_the_objects(vqa):
    for ex in vqa["train"] + vqa["val"]:
        answer, qtype, atype = vqa_truth(ex["question"], objects(ex))
        humans = Counter(ex["answers"])
        assert len(ex["answers"]) == 10 and humans[answer] >= 6, (ex["question"], ex["answers"], answer)
        assert ex["multiple_choice_answer"] == answer, ex["question"]
        assert (ex["question_type"], ex["answer_type"]) == (qtype, atype)
    misses = [a for ex in vqa["train"] for a in ex["answers"] if a != ex["multiple_choice_answer"]]
    assert 0.05 < len(misses) / (10 * len(vqa["train"])) < 0.15  # annotators right with p ~ 0.9


def test_vqa_questions_and_answers_are_balanced(vqa):
    train = vqa["train"]
    by_type = defaultdict(Counter)
    for ex in train:
        by_type[ex["question_type"]][ex["multiple_choice_answer"]] += 1
    assert set(by_type) == {"what color is the", "what pattern", "how many", "is there a", "what is"}
    sizes = [sum(c.values()) for c in by_type.values()]
    assert max(sizes) - min(sizes) <= 0.1 * len(train) / 5
    assert 0.4 <= by_type["is there a"]["yes"] / sum(by_type["is there a"].values()) <= 0.6
    counts = by_type["how many"]
    assert set(counts) == {"0", "1", "2", "3", "4"} and max(counts.values()) <= 1.5 * min(counts.values())
    for kind in ("what color is the", "what is"):
        shares = np.array(list(by_type[kind].values())) / sum(by_type[kind].values())
        assert len(shares) == 6 and shares.max() < 0.25, (kind, by_type[kind])
    # the words alone: the best answer per exact question text does no better than the balanced priors
    pairs = {s: [(ex["question"], ex["multiple_choice_answer"]) for ex in vqa[s]] for s in vqa}
    assert prior_accuracy(pairs["train"], pairs["val"]) < 0.42
    # "is there a red fish?" -> "no" mostly with a fish and something red in the image (binding needed)
    negatives = [ex for ex in train if ex["question_type"] == "is there a" and ex["multiple_choice_answer"] == "no"]
    both = 0
    for ex in negatives:
        colour, label = re.fullmatch(rf"is there an? ({COLOUR}) ({CLASS})\?", ex["question"]).groups()
        both += bool(having(objects(ex), label)) and bool(having(objects(ex), colour=colour))
    assert both / len(negatives) > 0.55


def test_vqa_images_have_up_to_three_questions_of_different_kinds(vqa):
    by_image = defaultdict(list)
    for ex in vqa["train"]:
        by_image[ex["image_id"]].append(ex)
    assert 2.0 < len(vqa["train"]) / len(by_image) <= 3.0
    for exs in by_image.values():
        kinds = [ex["question_type"] for ex in exs]
        assert len(kinds) == len(set(kinds)) <= 3
        assert all(ex["image"] == exs[0]["image"] for ex in exs)


def test_nlvr2_labels_follow_from_the_objects_and_are_balanced(nlvr2):
    per_template = defaultdict(Counter)
    for split, exs in nlvr2.items():
        for i, ex in enumerate(exs):
            template, truth = nlvr2_truth(ex["sentence"], objects(ex["left"]), objects(ex["right"]))
            assert truth == ex["label"], ex["sentence"]
            per_template[template][truth] += 1
            assert ex["identifier"] == f"{split}-{i}-0-0"
            assert (ex["left"]["image_id"], ex["right"]["image_id"]) == (f"{split}-{i}-0-img0", f"{split}-{i}-0-img1")
    assert len(per_template) == 6
    for template, c in per_template.items():
        assert 0.4 <= c[True] / (c[True] + c[False]) <= 0.6, (template, c)
    pairs = {s: [(ex["sentence"], ex["label"]) for ex in exs] for s, exs in nlvr2.items()}
    assert prior_accuracy(pairs["train"], pairs["dev"]) < 0.6


def test_ve_labels_follow_from_the_objects(ve):
    by_image = defaultdict(list)
    clause_of = Counter()
    for ex in ve["train"] + ve["dev"]:
        holds, clause = ve_truth(ex["hypothesis"], objects(ex))
        label = ex["gold_label"]
        assert holds == (label != "contradiction"), (ex["hypothesis"], label)
        assert clause == (label == "neutral") or label == "contradiction", (ex["hypothesis"], label)
        clause_of[label, clause] += 1
        by_image[ex["image_id"]].append(label)
    assert all(sorted(labels) == sorted(W.VE_LABELS) for labels in by_image.values())
    # contradictions carry the clause about half the time, so the clause alone does not decide
    with_clause = clause_of["contradiction", True] / (clause_of["contradiction", True] + clause_of["contradiction", False])
    assert 0.35 < with_clause < 0.65
    # and the label is not where the hypothesis sits among its image's three
    first = Counter(ex["gold_label"] for ex in ve["train"] if ex["pair_id"].endswith("#0"))
    assert max(first.values()) < 0.5 * sum(first.values())


def test_refcoco_expressions_single_out_their_target(refcoco):
    levels = Counter()
    for split, exs in refcoco.items():
        for ex in exs:
            objs = objects(ex)
            assert len(objs) >= 2
            (target,) = referents(ex["sentence"], objs)
            assert np.array_equal(target["box"], np.asarray(ex["bbox"], np.float64) * 64) and target["label"] == ex["category"]
            words = ex["sentence"].split()
            if any(r in ex["sentence"] for r in RELATION):
                levels["relation"] += 1
            elif len(words) == 2:
                levels["class"] += 1
            else:  # an attribute was needed: the class alone fits more than one object
                assert len(having(objs, target["label"])) >= 2, ex["sentence"]
                levels["attributes"] += 1
    assert all(levels[k] > 0.05 * sum(levels.values()) for k in ("relation", "class", "attributes")), levels
    assert {ex["category"] for ex in refcoco["testA"]} == {"fish", "car", "boat"}
    assert {ex["category"] for ex in refcoco["testB"]} == {"kite", "plane", "flower"}
    assert {ex["category"] for ex in refcoco["train"]} == set(COARSE_NAMES)
    # RefCOCO+'s distractors: most targets share their class with another object in the image
    same = [len(having(objects(ex), ex["category"])) >= 2 for ex in refcoco["train"]]
    assert np.mean(same) > 0.6
    refs_per_image = Counter(ex["image_id"] for ex in refcoco["train"])
    assert max(refs_per_image.values()) == 2 and len(refcoco["train"]) > 0.9 * 300


def test_refcoco_target_is_detected(refcoco):
    exs = [ex for s in refcoco.values() for ex in s]
    hits = [max(iou(ex["bbox"], t) for t in ex["tags"]["bbox"]) > 0.5 for ex in exs]
    assert np.mean(hits) >= 0.9


def test_generation_is_deterministic_and_seeded():
    for task in W.TASKS:
        split = W.TASK_SPLITS[task][-1]
        a, b, c = generate(task, split, 12), generate(task, split, 12), generate(task, split, 12, seed=1)
        block = (lambda ex: ex["left"]) if task == "nlvr2" else (lambda ex: ex)
        assert [block(x)["image"] for x in a] == [block(x)["image"] for x in b]
        assert [str(x) for x in a] == [str(x) for x in b]
        assert block(a[0])["image"] != block(c[0])["image"]


# --- the TFDS builder and the reader ---------------------------------------------------------------


def _load(b) -> dict[str, list[dict]]:
    import tensorflow_datasets as tfds

    return {s: list(tfds.as_numpy(b.as_dataset(split=s, shuffle_files=False))) for s in b.info.splits}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vlcore.world.task_builder import prepare_task

    root = tmp_path_factory.mktemp("tasks_a")
    return root, {task: prepare_task(root, task, "tiny") for task in W.TASKS}


def test_builds_are_byte_identical(tiny, tmp_path):
    from vlcore.world.task_builder import prepare_task

    def digests(b):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(b.data_dir).glob("*.tfrecord*"))}

    for task in ("vqa", "nlvr2"):
        first = digests(tiny[1][task])
        assert first and first == digests(prepare_task(tmp_path, task, "tiny"))


def test_tiny_configs_hold_the_generated_examples(tiny):
    for task, b in tiny[1].items():
        data = _load(b)
        assert set(data) == set(W.TASK_SPLITS[task])
        for split, rows in data.items():
            direct = generate(task, split, 40)
            assert 30 <= len(rows) == len(direct) <= 45
            key = {"vqa": "question", "nlvr2": "sentence", "ve": "hypothesis", "refcoco": "sentence"}[task]
            assert sorted(_s(r[key]) for r in rows) == sorted(ex[key] for ex in direct)
            images = [r["left"]["image"] for r in rows] if task == "nlvr2" else [r["image"] for r in rows]
            assert all(im.shape == (64, 64, 3) and im.dtype == np.uint8 and im.std() > 5 for im in images)


def test_no_image_is_shared_between_splits(tiny):
    for task, b in tiny[1].items():
        owner: dict[str, str] = {}
        pixels: dict[bytes, str] = {}
        for split, rows in _load(b).items():
            blocks = [blk for r in rows for blk in ((r["left"], r["right"]) if task == "nlvr2" else (r,))]
            for blk in blocks:
                key = _s(blk["image_id"])
                assert owner.setdefault(key, split) == split, (task, key)
                digest = hashlib.sha256(blk["image"].tobytes()).digest()
                assert pixels.setdefault(digest, key) == key, (task, key, pixels[digest])


def test_load_world_task(tiny):
    from jaxmuvla.regions import RegionSettings, world_regions
    from jaxmuvla.tasks.common import TaskDataError
    from jaxmuvla.tasks.world import load_world_task

    root, builders = tiny
    train, images = load_world_task(root, "vqa", "tiny", "train")
    rows = _load(builders["vqa"])["train"]
    mca = Counter(_s(r["multiple_choice_answer"]) for r in rows)
    assert list(train.answers) == sorted(mca, key=lambda a: (-mca[a], a))
    assert train.labels.shape == (len(rows), len(mca)) and train.labels.dtype == np.float32
    for i, humans in enumerate(train.extras["human_answers"]):
        want = [min(1.0, humans.count(a) / 3) for a in train.answers]
        np.testing.assert_allclose(train.labels[i], want, atol=1e-6)
    assert train.ids == sorted(train.ids) and len(set(train.ids)) == len(train)
    assert images.keys == train.image_keys() and images.batch["image"].shape == (len(images.keys), 64, 64, 3)
    val, _ = load_world_task(root, "vqa", "tiny", "val", answers=("yes", "no"))
    assert val.answers == ("yes", "no") and val.labels.shape == (len(val), 2)
    assert set(val.extras["answer_type"]) <= {"yes/no", "number", "other"}

    class ZeroEncoder:  # region features are beside the point here: the batch layout is
        def encode_regions(self, images, boxes, method, valid):
            return np.zeros(boxes.shape[:2] + (3,), np.float32)

    regions = world_regions(images.batch, ZeroEncoder(), COARSE_NAMES, RegionSettings())
    assert regions.features.shape[0] == len(images.keys) and (regions.num >= 1).all()

    pairs, pair_images = load_world_task(root, "nlvr2", "tiny", "dev")
    assert all(len(k) == 2 and k[0].endswith("img0") and k[1].endswith("img1") for k in pairs.images)
    assert len(pair_images.keys) == 2 * len(pairs) and set(pairs.labels) == {0, 1}
    for i, row in enumerate(sorted(_load(builders["nlvr2"])["dev"], key=lambda r: int(_s(r["identifier"]).split("-")[1]))):
        assert (pairs.ids[i], pairs.labels[i]) == (_s(row["identifier"]), int(row["label"]))

    hyps, _ = load_world_task(root, "ve", "tiny", "test")
    assert hyps.labels.dtype == np.int32 and np.bincount(hyps.labels, minlength=3).tolist() == [len(hyps) // 3] * 3

    refs, ref_images = load_world_task(root, "refcoco", "tiny", "testA")
    assert refs.labels.shape == (len(refs), 4) and set(refs.extras["category"]) <= {"fish", "car", "boat"}
    x1, y1, x2, y2 = refs.labels.T
    assert ((0 <= x1) & (x1 < x2) & (x2 <= 1) & (0 <= y1) & (y1 < y2) & (y2 <= 1)).all()
    by_key = dict(zip(ref_images.keys, ref_images.batch["tags_bbox"]))
    hits = [max(iou(box[[1, 0, 3, 2]], t) for t in by_key[k[0]]) > 0.5 for box, k in zip(refs.labels, refs.images)]
    assert np.mean(hits) >= 0.9
    with pytest.raises(TaskDataError, match="splits"):
        load_world_task(root, "refcoco", "tiny", "test")
