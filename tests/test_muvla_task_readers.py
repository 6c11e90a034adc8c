"""The downstream readers on small files in the real formats, and the restricted unpickler.

Every expected value (image keys, labels, normalised boxes, the vocabulary, soft scores) is
worked out by hand in the test.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from jaxmuvla.tasks.common import VE_LABELS, TaskDataError
from jaxmuvla.tasks.nlvr2 import read_nlvr2
from jaxmuvla.tasks.refcoco import read_refcoco
from jaxmuvla.tasks.safe_pickle import load_restricted_pickle
from jaxmuvla.tasks.snli_ve import read_snli_ve
from jaxmuvla.tasks.vqa import build_answer_vocabulary, read_vqa, soft_scores


def _write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------- VQA v2

def _humans(answers: list[str]) -> list[dict]:
    return [{"answer_id": i + 1, "answer": a, "answer_confidence": "yes"} for i, a in enumerate(answers)]


def _vqa_questions() -> dict:
    return {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {},
            "questions": [{"question_id": 11, "image_id": 100, "question": "Is the dog brown?"},
                          {"question_id": 12, "image_id": 100, "question": "How many cats?"},
                          {"question_id": 13, "image_id": 200, "question": "What is it?"}]}


def _vqa_annotations() -> dict:
    return {"annotations": [
        {"question_id": 11, "image_id": 100, "question_type": "is the", "answer_type": "yes/no",
         "multiple_choice_answer": "yes", "answers": _humans(["yes"] * 8 + ["no"] * 2)},
        {"question_id": 12, "image_id": 100, "question_type": "how many", "answer_type": "number",
         "multiple_choice_answer": "two", "answers": _humans(["2"] * 2 + ["two"] * 2 + ["3"] * 6)},
        {"question_id": 13, "image_id": 200, "question_type": "what is", "answer_type": "other",
         "multiple_choice_answer": "a cat", "answers": _humans(["a cat", "kitten", "kitten"] + ["zebra"] * 7)},
    ]}


@pytest.fixture
def vqa_files(tmp_path):
    return (_write_json(tmp_path / "questions.json", _vqa_questions()),
            _write_json(tmp_path / "annotations.json", _vqa_annotations()))


def test_read_vqa_with_its_own_vocabulary(vqa_files):
    examples = read_vqa(*vqa_files, split="train")
    assert examples.task == "vqa" and examples.split == "train"
    assert examples.ids == [11, 12, 13]
    assert examples.texts == ["Is the dog brown?", "How many cats?", "What is it?"]
    assert examples.images == [("100",), ("100",), ("200",)]
    # multiple_choice_answers "yes", "two" -> "2", "a cat" -> "cat": one each, so alphabetical
    assert examples.answers == ("2", "cat", "yes")
    expected = np.array([[0, 0, 1],  # 8 humans say yes
                         [1, 0, 0],  # "2" x2 + "two" x2 = 4 -> min(1, 4/3)
                         [0, 1 / 3, 0]],  # one "a cat"; kitten and zebra are not in the vocabulary
                        np.float32)
    assert examples.labels.dtype == np.float32
    np.testing.assert_allclose(examples.labels, expected, rtol=1e-6)
    assert examples.extras["human_answers"][1] == ["2", "2", "two", "two"] + ["3"] * 6
    assert examples.extras["answer_type"] == ["yes/no", "number", "other"]
    assert examples.extras["question_type"] == ["is the", "how many", "what is"]


def test_read_vqa_keeps_questions_without_a_known_answer(vqa_files, caplog):
    with caplog.at_level(logging.INFO, logger="jaxmuvla.tasks.vqa"):
        examples = read_vqa(*vqa_files, answers=("no", "3", "zebra"), split="val")
    np.testing.assert_allclose(examples.labels, [[2 / 3, 0, 0], [0, 1, 0], [0, 0, 1]], rtol=1e-6)
    assert len(examples) == 3
    with caplog.at_level(logging.INFO, logger="jaxmuvla.tasks.vqa"):
        read_vqa(*vqa_files, answers=("yes", "maybe"), split="val")
    assert "2 of 3 questions have no human answer" in caplog.text


def test_read_vqa_test_dev_has_no_labels(vqa_files):
    examples = read_vqa(vqa_files[0], answers=("yes", "no"), split="test-dev")
    assert examples.labels.shape == (3, 2) and not examples.labels.any()
    assert examples.extras["human_answers"] == [[], [], []]
    assert examples.images == [("100",), ("100",), ("200",)]
    with pytest.raises(TaskDataError, match="no annotations to build the answer vocabulary"):
        read_vqa(vqa_files[0], split="test-dev")


def test_answer_vocabulary_top_n_ties_alphabetical():
    answers = ["yes", "Yes", "no", "two", "2", "cat", "dog", "the", "dog"]
    annotations = [{"multiple_choice_answer": a} for a in answers]
    # normalised counts: yes 2, 2 2, dog 2, no 1, cat 1 ("the" normalises to nothing)
    assert build_answer_vocabulary(annotations, top=4) == ("2", "dog", "yes", "cat")
    assert build_answer_vocabulary({"annotations": annotations}, top=10) == ("2", "dog", "yes", "cat", "no")


def test_soft_scores_by_hand():
    humans = [["red", "Red", "red.", "blue"] + ["green"] * 6, ["two", "2", "blue"], []]
    scores = soft_scores(humans, ("red", "blue", "2", "green"))
    expected = np.array([[1, 1 / 3, 0, 1],  # red x3 after normalising, blue x1, green x6
                         [0, 1 / 3, 2 / 3, 0],
                         [0, 0, 0, 0]], np.float32)
    assert scores.dtype == np.float32 and scores.shape == (3, 4)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def _broken(change) -> tuple[dict, dict]:
    questions, annotations = _vqa_questions(), _vqa_annotations()
    change(questions, annotations)
    return questions, annotations


@pytest.mark.parametrize("change, message", [
    (lambda q, a: q["questions"][1].pop("image_id"), r"questions\[1\] \(question_id 12\): missing field 'image_id'"),
    (lambda q, a: q["questions"][0].update(question_id="11"),
     r"questions\[0\]: field 'question_id' is '11', expected int"),
    (lambda q, a: q.update(questions=[]), r"questions.json: 'questions' is empty"),
    (lambda q, a: q.pop("questions"), r"questions.json: expected a JSON object with a 'questions' list"),
    (lambda q, a: a["annotations"][2].update(question_id=99),
     r"annotations.json: question_id 99 is annotated but not in the questions file"),
    (lambda q, a: a["annotations"][1].update(image_id=300),
     r"question_id 12: field 'image_id' is 300, its question's is 100"),
    (lambda q, a: a["annotations"][0].update(answer_type="maybe"),
     r"annotations\[0\] \(question_id 11\): field 'answer_type' is 'maybe'"),
    (lambda q, a: a["annotations"][0]["answers"][3].update(answer=3),
     r"answers\[3\]: field 'answer' is 3, expected str"),
    (lambda q, a: a["annotations"].pop(2), r"no annotation for question_id 13"),
])
def test_read_vqa_refuses_bad_files(tmp_path, change, message):
    questions, annotations = _broken(change)
    with pytest.raises(TaskDataError, match=message):
        read_vqa(_write_json(tmp_path / "questions.json", questions),
                 _write_json(tmp_path / "annotations.json", annotations))


def test_read_vqa_refuses_a_file_that_is_not_json(tmp_path, vqa_files):
    (tmp_path / "bad.json").write_text('{"questions": [')
    with pytest.raises(TaskDataError, match=r"bad.json: bad JSON"):
        read_vqa(tmp_path / "bad.json", vqa_files[1])


# ---------------------------------------------------------------- NLVR2

def test_read_nlvr2(tmp_path):
    path = _write_lines(tmp_path / "dev.json", [
        json.dumps({"identifier": "dev-850-0-1", "sentence": "There are two dogs.", "label": "True",
                    "left_url": "http://x/l.jpg", "right_url": "http://x/r.jpg", "writer": "3"}),
        "",
        json.dumps({"identifier": "dev-850-1-0", "sentence": "One image has a cat.", "label": "False"}),
    ])
    examples = read_nlvr2(path, "dev")
    assert examples.task == "nlvr2" and examples.ids == ["dev-850-0-1", "dev-850-1-0"]
    assert examples.images == [("dev-850-0-img0", "dev-850-0-img1"), ("dev-850-1-img0", "dev-850-1-img1")]
    assert examples.labels.dtype == np.int32 and examples.labels.tolist() == [1, 0]
    assert examples.texts == ["There are two dogs.", "One image has a cat."]
    assert examples.image_keys() == ["dev-850-0-img0", "dev-850-0-img1", "dev-850-1-img0", "dev-850-1-img1"]


@pytest.mark.parametrize("second_line, message", [
    ('{"identifier": "dev-1-0-0", "sentence": "s", "label": "true"}',
     r"dev.json: line 2: field 'label' is 'true', expected \"True\" or \"False\""),
    ('{"identifier": "dev-1-0-0", "sentence": "s", "label": true}', r"line 2: field 'label' is True, expected str"),
    ('{"identifier": "dev-1-0-0", "sentence": "s", "label": "True"', r"line 2: bad JSON"),
    ('{"identifier": "dev", "sentence": "s", "label": "True"}', r"line 2: field 'identifier' is 'dev'"),
    ('{"identifier": "dev-1-0-0", "label": "True"}', r"line 2: missing field 'sentence'"),
    ('{"identifier": "dev-850-0-1", "sentence": "s", "label": "True"}', r"line 2: .*already on line 1"),
])
def test_read_nlvr2_refuses_bad_lines(tmp_path, second_line, message):
    first = json.dumps({"identifier": "dev-850-0-1", "sentence": "s", "label": "True"})
    with pytest.raises(TaskDataError, match=message):
        read_nlvr2(_write_lines(tmp_path / "dev.json", [first, second_line]), "dev")


def test_read_nlvr2_refuses_an_empty_file(tmp_path):
    with pytest.raises(TaskDataError, match=r"empty.json: no examples"):
        read_nlvr2(_write_lines(tmp_path / "empty.json", ["", "  "]), "dev")


# ---------------------------------------------------------------- SNLI-VE

def test_read_snli_ve(tmp_path):
    path = _write_lines(tmp_path / "snli_ve_dev.jsonl", [
        json.dumps({"Flikr30kID": "1000092795.jpg", "pairID": "1000092795.jpg#0r1e", "gold_label": "entailment",
                    "sentence1": "Two young guys.", "sentence2": "Two men are outside."}),
        json.dumps({"Flikr30kID": "1000092795.jpg", "pairID": "1000092795.jpg#0r1c", "gold_label": "contradiction",
                    "sentence2": "Nobody is there."}),
        json.dumps({"Flikr30kID": "36979.jpg", "gold_label": "neutral", "sentence2": "A group of friends."}),
    ])
    examples = read_snli_ve(path, "dev")
    assert examples.task == "ve"
    assert examples.ids == ["1000092795.jpg#0r1e", "1000092795.jpg#0r1c", 2]  # no pairID: the line's index
    assert examples.images == [("1000092795",), ("1000092795",), ("36979",)]
    assert examples.texts == ["Two men are outside.", "Nobody is there.", "A group of friends."]
    assert VE_LABELS == ("entailment", "neutral", "contradiction")
    assert examples.labels.dtype == np.int32 and examples.labels.tolist() == [0, 2, 1]


@pytest.mark.parametrize("line, message", [
    ('{"Flikr30kID": "1.jpg", "gold_label": "-", "sentence2": "s"}',
     r"snli.jsonl: line 2: field 'gold_label' is '-', expected one of"),
    ('{"Flickr30kID": "1.jpg", "gold_label": "neutral", "sentence2": "s"}', r"line 2: missing field 'Flikr30kID'"),
    ('{"Flikr30kID": "1.jpg", "gold_label": "neutral"}', r"line 2: missing field 'sentence2'"),
    ('["1.jpg", "neutral"]', r"line 2: expected a JSON object, got list"),
])
def test_read_snli_ve_refuses_bad_lines(tmp_path, line, message):
    first = json.dumps({"Flikr30kID": "2.jpg", "gold_label": "neutral", "sentence2": "s"})
    with pytest.raises(TaskDataError, match=message):
        read_snli_ve(_write_lines(tmp_path / "snli.jsonl", [first, line]), "dev")


# ---------------------------------------------------------------- RefCOCO+

def _refs() -> list[dict]:
    def ref(ref_id, ann_id, image_id, split, category_id, sentences):
        return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": category_id,
                "sentences": [{"sent_id": s, "sent": t, "raw": t.capitalize(), "tokens": t.split()}
                              for s, t in sentences],
                "sent_ids": [s for s, _ in sentences], "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg"}

    return [ref(0, 1000, 5, "testA", 1, [(10, "man on left"), (11, "left guy")]),
            ref(1, 1001, 6, "testB", 3, [(12, "red car")]),
            ref(2, 1002, 5, "train", 1, [(13, "woman")])]


def _instances() -> dict:
    return {"images": [{"id": 5, "width": 640, "height": 480, "file_name": "a.jpg"},
                       {"id": 6, "width": 500, "height": 400, "file_name": "b.jpg"}],
            "annotations": [{"id": 1000, "image_id": 5, "bbox": [64, 48, 320, 240], "category_id": 1},
                            {"id": 1001, "image_id": 6, "bbox": [0.0, 100.0, 250.0, 300.0], "category_id": 3},
                            {"id": 1002, "image_id": 5, "bbox": [10, 10, 20, 20], "category_id": 1}],
            "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                           {"id": 3, "name": "car", "supercategory": "vehicle"}]}


def _refcoco_files(tmp_path: Path, refs=None, instances=None) -> tuple[Path, Path]:
    refs_path = tmp_path / "refs(unc).p"
    refs_path.write_bytes(pickle.dumps(_refs() if refs is None else refs, protocol=2))
    return refs_path, _write_json(tmp_path / "instances.json", _instances() if instances is None else instances)


def test_read_refcoco(tmp_path):
    refs_path, instances_path = _refcoco_files(tmp_path)
    test_a = read_refcoco(refs_path, instances_path, "testA", allow_pickle=True)
    assert test_a.task == "refcoco" and test_a.ids == [10, 11] and test_a.texts == ["man on left", "left guy"]
    assert test_a.images == [("5",), ("5",)]
    # [64, 48, 320, 240] in 640x480: x1 = 64/640, y1 = 48/480, x2 = 384/640, y2 = 288/480
    assert test_a.labels.dtype == np.float32
    np.testing.assert_allclose(test_a.labels, [[0.1, 0.1, 0.6, 0.6]] * 2, rtol=1e-6)
    assert test_a.extras == {"category": ["person", "person"], "ref_id": [0, 0]}
    test_b = read_refcoco(refs_path, instances_path, "testB", allow_pickle=True)
    # [0, 100, 250, 300] in 500x400: 0/500, 100/400, 250/500, 400/400
    np.testing.assert_allclose(test_b.labels, [[0.0, 0.25, 0.5, 1.0]], rtol=1e-6)
    assert test_b.extras["category"] == ["car"] and test_b.ids == [12]


def test_read_refcoco_refuses_without_allow_pickle(tmp_path):
    refs_path, instances_path = _refcoco_files(tmp_path)
    with pytest.raises(TaskDataError, match=r"refs\(unc\).p: is a pickle.*allow_pickle=True"):
        read_refcoco(refs_path, instances_path, "testA")


def _ref_with(**changes) -> list[dict]:
    refs = _refs()
    refs[0].update(changes)
    return refs


def _instances_with_box(box) -> dict:
    instances = _instances()
    instances["annotations"][0]["bbox"] = box
    return instances


@pytest.mark.parametrize("split, refs, instances, message", [
    ("test", None, None, r"split 'test': expected one of \('train', 'val', 'testA', 'testB'\)"),
    ("val", None, None, r"no refs of split 'val'"),
    ("testA", _ref_with(ann_id=4242), None, r"refs\[0\] \(ref_id 0\): ann_id 4242 is not in .*instances.json"),
    ("testA", _ref_with(image_id=77), None, r"refs\[0\] \(ref_id 0\): image_id 77 is not in"),
    ("testA", _ref_with(image_id=6), None, r"ann_id 1000 is on image 5 .* the ref says 6"),
    ("testA", None, _instances_with_box([600, 0, 100, 100]), r"bbox \[600, 0, 100, 100\] is not inside its 640x480"),
    ("testA", None, _instances_with_box([-5, 0, 10, 10]), r"is not inside"),
    ("testA", None, _instances_with_box([0, 0, 10]), r"field 'bbox' is \[0, 0, 10\], expected \[x, y, w, h\]"),
    ("testA", {"refs": []}, None, r"expected a list of refs, got dict"),
])
def test_read_refcoco_refuses_bad_inputs(tmp_path, split, refs, instances, message):
    refs_path, instances_path = _refcoco_files(tmp_path, refs, instances)
    with pytest.raises(TaskDataError, match=message):
        read_refcoco(refs_path, instances_path, split, allow_pickle=True)


# ---------------------------------------------------------------- the restricted unpickler

class OpensAFile:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


class RunsAShell:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch '{self.path}'",)


class PlainObject:
    pass


def test_restricted_unpickler_refuses_code(tmp_path):
    # the payload is live: the plain unpickler does create its file
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(OpensAFile(str(proof)), protocol=2)).close()
    assert proof.exists()

    for name, payload, asks_for in (("open", OpensAFile, r"asks for (io|builtins)\.open"),
                                    ("shell", RunsAShell, r"asks for (posix|os|nt)\.system")):
        marker = tmp_path / f"marker-{name}"
        path = tmp_path / f"{name}.p"
        path.write_bytes(pickle.dumps([{"ref_id": 1}, payload(str(marker))], protocol=2))
        with pytest.raises(TaskDataError, match=f"{name}.p: refused to load: the pickle {asks_for}"):
            load_restricted_pickle(path, allow_pickle=True)
        assert not marker.exists()

    objects = tmp_path / "objects.p"
    objects.write_bytes(pickle.dumps(PlainObject(), protocol=2))
    with pytest.raises(TaskDataError, match=r"asks for [\w.]*(copyreg|copy_reg|PlainObject)"):
        load_restricted_pickle(objects, allow_pickle=True)


def test_restricted_unpickler_needs_the_opt_in(tmp_path):
    path = tmp_path / "plain.p"
    path.write_bytes(pickle.dumps([1, 2], protocol=2))
    for refused in (False, None, "yes", 1):
        with pytest.raises(TaskDataError, match=r"plain.p: is a pickle, and loading a pickle can run code"
                                                r".*--config.data.allow_pickle=True"):
            load_restricted_pickle(path, allow_pickle=refused)


def test_restricted_unpickler_loads_plain_data(tmp_path):
    refs = _refs()
    refs[0]["tags"] = {"a", "b"}
    refs[1]["pair"] = (1.5, None, True)
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps(refs, protocol=2))
    assert load_restricted_pickle(path, allow_pickle=True) == refs

    # a Python 2 pickle, as RefCOCO+ ships: byte strings (latin1) and __builtin__.set
    py2 = tmp_path / "py2.p"
    py2.write_bytes(b"\x80\x02]q\x00}q\x01(U\x04sentq\x02U\x04caf\xe9q\x03U\x03idsq\x04c__builtin__\nset\nq\x05"
                    b"]q\x06(K\x01K\x02e\x85q\x07Rq\x08ua.")
    assert load_restricted_pickle(py2, allow_pickle=True) == [{"sent": "caf\u00e9", "ids": {1, 2}}]


def test_restricted_unpickler_reports_a_broken_file(tmp_path):
    path = tmp_path / "cut.p"
    path.write_bytes(pickle.dumps(_refs(), protocol=2)[:40])
    with pytest.raises(TaskDataError, match=r"cut.p: not a readable pickle"):
        load_restricted_pickle(path, allow_pickle=True)
    with pytest.raises(TaskDataError, match=r"missing.p: cannot read"):
        load_restricted_pickle(tmp_path / "missing.p", allow_pickle=True)
