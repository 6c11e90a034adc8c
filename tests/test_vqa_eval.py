"""The official VQA accuracy: answer normalisation, the 10-choose-9 average, per-type scores and the command.

Expected values are worked out by hand in the comments, or come from `OfficialReference`, a
line-by-line transcription of the official vqaEval.py loops (GT-Vision-Lab/VQA) written here.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxmuvla import vqa_eval
from jaxmuvla.tasks.common import TaskDataError
from jaxmuvla.tasks.vqa import (ARTICLES, CONTRACTIONS, NUMBER_WORDS, PUNCTUATION, evaluate_results,
                                normalize_answer, official_accuracy)

REPO = Path(__file__).resolve().parents[1]


class OfficialReference:
    """The official evaluate / processPunctuation / processDigitArticle, transcribed in its own style."""

    period_strip = re.compile(r"(?!<=\d)(\.)(?!\d)")
    comma_strip = re.compile(r"(\d)(\,)(\d)")

    def process_punctuation(self, in_text):
        out_text = in_text
        for p in PUNCTUATION:
            if (p + " " in in_text or " " + p in in_text) or (re.search(self.comma_strip, in_text) is not None):
                out_text = out_text.replace(p, "")
            else:
                out_text = out_text.replace(p, " ")
        return self.period_strip.sub("", out_text, int(re.UNICODE))  # positional: the official call's count

    def process_digit_article(self, in_text):
        manual_map = dict(NUMBER_WORDS)
        out_text = []
        for word in in_text.lower().split():
            word = manual_map.setdefault(word, word)
            if word not in ARTICLES:
                out_text.append(word)
        for word_id, word in enumerate(out_text):
            if word in CONTRACTIONS:
                out_text[word_id] = CONTRACTIONS[word]
        return " ".join(out_text)

    def accuracy(self, res_ans, gt_answers):
        gts = [{"answer_id": i + 1, "answer": a, "answer_confidence": "yes"} for i, a in enumerate(gt_answers)]
        res_ans = res_ans.replace("\n", " ").replace("\t", " ").strip()
        res_ans = self.process_digit_article(self.process_punctuation(res_ans))
        if len(set(a["answer"] for a in gts)) > 1:
            for ans_dic in gts:
                ans_dic["answer"] = self.process_punctuation(ans_dic["answer"])
        gt_acc = []
        for gt_ans_datum in gts:
            other = [item for item in gts if item != gt_ans_datum]
            matching = [item for item in other if item["answer"] == res_ans]
            gt_acc.append(min(1, float(len(matching)) / 3))
        return float(sum(gt_acc)) / len(gt_acc)


@pytest.mark.parametrize("raw, expected", [
    ("a fish", "fish"), ("The Fish", "fish"), ("an apple\tpie\n", "apple pie"),
    ("yes.", "yes"), ("yes!", "yes"), ("Yes!!", "yes"),
    ("two", "2"), ("Two Dogs", "2 dogs"), ("none", "0"), ("ten", "10"),
    ("dont", "don't"), ("Dont", "don't"), ("somebody'd", "somebodyd"),  # the table maps this one backwards
    ("Im", "im"),  # the official table's capitalised keys never match lower-cased words
    ("3.5", "3.5"), ("1,000", "1000"), ("black-and-white", "black and white"),
    # '-' touches no space: becomes a space; ', ' touches one: dropped
    ("t-shirt, red", "t shirt red"),
    ("x" + "." * 40, "x" + "." * 8),  # the official call removes at most 32 periods
    # each mark is judged on the input: no '?' touches a space there, so both become spaces
    # (";" -> " " puts a space before the first '?' only in the text being cleaned)
    ("x;?y c?d", "x y c d"),
])
def test_normalize_answer_by_hand(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_answer_matches_the_official_transcription():
    pieces = ["a", "the", "an", "Two", "none", "dont", "Yes", "fish", "3.5", "1,000", "x", "Im", "ten"]
    glue = [" ", "", "!", "?", ",", ", ", "-", ".", "/", "\t", "'", " (", ") ", "..."]
    rng = random.Random(0)
    reference = OfficialReference()
    for _ in range(500):
        text = "".join(rng.choice(pieces) + rng.choice(glue) for _ in range(rng.randint(1, 4)))
        expected = reference.process_digit_article(
            reference.process_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))
        assert normalize_answer(text) == expected, text


@pytest.mark.parametrize("humans, predicted, expected", [
    # k of 10 humans match: k matching left-out humans see k-1 others, 10-k see k
    (["2"] * 1 + ["3"] * 9, "2", 0.3),  # (1*0 + 9*1/3) / 10
    (["2"] * 2 + ["3"] * 8, "2", 0.6),  # (2*1/3 + 8*2/3) / 10
    (["2"] * 2 + ["3"] * 8, "two", 0.6),  # the prediction's number word becomes "2"
    (["2"] * 3 + ["3"] * 7, "2", 0.9),  # (3*2/3 + 7*1) / 10
    (["2"] * 4 + ["3"] * 6, "2", 1.0),
    (["2"] * 4 + ["3"] * 6, "4", 0.0),
    (["yes"] * 10, "Yes.", 1.0),
    (["Yes"] * 10, "yes", 0.0),  # unanimous human answers are compared raw (official quirk)
    (["yes."] * 10, "yes", 0.0),  # ... punctuation included
    (["yes."] * 3 + ["no"] * 7, "yes", 0.9),  # differing: punctuation processed, "yes." -> "yes"
    (["yes!"] * 3 + ["no"] * 7, "yes", 0.0),  # ... but "yes!" -> "yes " (a space, never stripped)
    (["a fish"] * 4 + ["cat"] * 6, "a fish", 0.0),  # humans keep their article, the prediction loses it
    (["don't"] * 3 + ["no"] * 7, "dont", 0.9),
    (["no"] * 3 + ["yes"] * 7, "No!", 0.9),
])
def test_official_accuracy_by_hand(humans, predicted, expected):
    assert official_accuracy(predicted, humans) == pytest.approx(expected, abs=1e-12)
    assert OfficialReference().accuracy(predicted, humans) == pytest.approx(expected, abs=1e-12)


def test_official_accuracy_matches_the_transcription_on_random_questions():
    words = ["yes", "Yes", "yes.", "no", "2", "two", "Two!", "a dog", "dog", "dog,", "red-white", "red white"]
    rng = random.Random(1)
    reference = OfficialReference()
    for _ in range(300):
        humans = [rng.choice(words) for _ in range(10)]
        predicted = rng.choice(words)
        assert official_accuracy(predicted, humans) == reference.accuracy(predicted, humans), (predicted, humans)


def _official_files():
    questions = {"questions": [{"question_id": 1, "image_id": 10, "question": "Is it red?"},
                               {"question_id": 2, "image_id": 10, "question": "Is it big?"},
                               {"question_id": 3, "image_id": 20, "question": "How many dogs?"}]}
    answers = {1: ["yes"] * 10, 2: ["no"] * 2 + ["yes"] * 8, 3: ["2"] * 1 + ["3"] * 9}
    types = {1: ("is it", "yes/no"), 2: ("is it", "yes/no"), 3: ("how many", "number")}
    annotations = {"annotations": [
        {"question_id": q, "image_id": 10 if q < 3 else 20, "question_type": types[q][0], "answer_type": types[q][1],
         "multiple_choice_answer": answers[q][-1],
         "answers": [{"answer_id": i + 1, "answer": a, "answer_confidence": "yes"} for i, a in enumerate(answers[q])]}
        for q in (1, 2, 3)]}
    # question 1: 1.0; question 2: 2 of 10 say "no" -> 0.6; question 3: 1 of 10 says "2" -> 0.3
    results = [{"question_id": 1, "answer": "Yes"}, {"question_id": 2, "answer": "no."},
               {"question_id": 3, "answer": "two"}]
    return questions, annotations, results


def test_evaluate_results_overall_and_per_type():
    scores = evaluate_results(*_official_files())
    assert scores["overall"] == 63.33  # (1 + 0.6 + 0.3) / 3 = 63.33%
    assert scores["perAnswerType"] == {"yes/no": 80.0, "number": 30.0}
    assert scores["perQuestionType"] == {"is it": 80.0, "how many": 30.0}
    assert scores["perQuestion"] == {1: 100.0, 2: 60.0, 3: 30.0}


@pytest.mark.parametrize("results, message", [
    ([{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "no"}], r"1 unanswered \(3\)"),
    ([{"question_id": q, "answer": "no"} for q in (1, 2, 3, 4)], r"1 not annotated \(4\)"),
    ([{"question_id": q, "answer": "no"} for q in (1, 2, 3, 3)], r"results\[3\]: question_id 3 appears twice"),
    ([{"question_id": 1, "answer": "no"}, {"question_id": 2, "answer": 2}, {"question_id": 3, "answer": "2"}],
     r"results\[1\] \(question_id 2\): field 'answer' is 2, expected str"),
    ([{"question_id": "1", "answer": "no"}], r"results\[0\]: field 'question_id' is '1', expected int"),
    ({"question_id": 1, "answer": "no"}, r"expected a JSON list"),
])
def test_evaluate_results_refuses_bad_results(results, message):
    questions, annotations, _ = _official_files()
    with pytest.raises(TaskDataError, match=message):
        evaluate_results(questions, annotations, results)


def _write_files(tmp_path: Path, results) -> list[str]:
    questions, annotations, _ = _official_files()
    paths = []
    for name, obj in (("questions", questions), ("annotations", annotations), ("results", results)):
        (tmp_path / f"{name}.json").write_text(json.dumps(obj))
        paths += [f"--{name}", str(tmp_path / f"{name}.json")]
    return paths


def test_command_prints_the_official_lines_and_writes_out(tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert vqa_eval.main(_write_files(tmp_path, _official_files()[2]) + ["--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Overall Accuracy is: 63.33"
    at = lines.index("Per Answer Type Accuracy is the following:")
    assert lines[at + 1:at + 3] == ["yes/no : 80.00", "number : 30.00"]
    assert "how many : 30.00" in lines
    written = json.loads(out.read_text())
    assert written["overall"] == 63.33 and written["perQuestion"] == {"1": 100.0, "2": 60.0, "3": 30.0}


def test_command_refuses_bad_results_without_writing(tmp_path, capsys):
    out = tmp_path / "scores.json"
    bad = [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": None}, {"question_id": 3, "answer": "2"}]
    assert vqa_eval.main(_write_files(tmp_path, bad) + ["--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "results.json" in err[0] and "'answer'" in err[0]
    assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotations.json", "questions.json", "results.json"]


def test_command_runs_as_a_module(tmp_path):
    args = _write_files(tmp_path, [])
    (tmp_path / "results.json").write_text("not json")
    proc = subprocess.run([sys.executable, "-m", "jaxmuvla.vqa_eval", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "bad JSON" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
