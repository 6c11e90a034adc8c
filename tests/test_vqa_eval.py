"""The official VQA accuracy: answer normalisation, the 10-choose-9 average, per-type scores and the command.

Expected values are worked out by hand in the comments, or come from `OfficialReference`, a
line-by-line transcription of the official vqaEval.py loops (GT-Vision-Lab/VQA) written here,
under both rules the official script has had: as of commit 458a8b2 (2016-10-08; the VQA v2
release of 2017) and as of commit a013f00 (2021-03-11, "Fixed processing answers bug").
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
from jaxmuvla.tasks.vqa import (ARTICLES, CONTRACTIONS, NUMBER_WORDS, PUNCTUATION, RULE_SOURCES, evaluate_results,
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

    @staticmethod
    def _answer_dicts(gt_answers):
        return [{"answer_id": i + 1, "answer": a, "answer_confidence": "yes"} for i, a in enumerate(gt_answers)]

    @staticmethod
    def _leave_one_out(gts, res_ans):
        gt_acc = []
        for gt_ans_datum in gts:
            other = [item for item in gts if item != gt_ans_datum]
            matching = [item for item in other if item["answer"] == res_ans]
            gt_acc.append(min(1, float(len(matching)) / 3))
        return float(sum(gt_acc)) / len(gt_acc)

    def accuracy_2017(self, res_ans, gt_answers):
        """The loop of vqaEval.py as of 458a8b2 (2016-10-08)."""
        gts = self._answer_dicts(gt_answers)
        res_ans = res_ans.replace("\n", " ").replace("\t", " ").strip()
        res_ans = self.process_digit_article(self.process_punctuation(res_ans))
        if len(set(a["answer"] for a in gts)) > 1:
            for ans_dic in gts:
                ans_dic["answer"] = self.process_punctuation(ans_dic["answer"])
        return self._leave_one_out(gts, res_ans)

    def accuracy_2021(self, res_ans, gt_answers):
        """The loop of vqaEval.py as of a013f00 (2021-03-11)."""
        gts = self._answer_dicts(gt_answers)
        for ans_dic in gts:
            ans_dic["answer"] = ans_dic["answer"].replace("\n", " ").replace("\t", " ").strip()
        res_ans = res_ans.replace("\n", " ").replace("\t", " ").strip()
        if len(set(a["answer"] for a in gts)) > 1:
            for ans_dic in gts:
                ans_dic["answer"] = self.process_digit_article(self.process_punctuation(ans_dic["answer"]))
            res_ans = self.process_digit_article(self.process_punctuation(res_ans))
        return self._leave_one_out(gts, res_ans)

    def accuracy(self, res_ans, gt_answers, rule):
        return {"2017": self.accuracy_2017, "2021": self.accuracy_2021}[rule](res_ans, gt_answers)


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


@pytest.mark.parametrize("humans, predicted, expected, expected_2021", [
    # k of 10 humans match: k matching left-out humans see k-1 others, 10-k see k
    (["2"] * 1 + ["3"] * 9, "2", 0.3, 0.3),  # (1*0 + 9*1/3) / 10
    (["2"] * 2 + ["3"] * 8, "2", 0.6, 0.6),  # (2*1/3 + 8*2/3) / 10
    (["2"] * 2 + ["3"] * 8, "two", 0.6, 0.6),  # the prediction's number word becomes "2"
    (["2"] * 3 + ["3"] * 7, "2", 0.9, 0.9),  # (3*2/3 + 7*1) / 10
    (["2"] * 4 + ["3"] * 6, "2", 1.0, 1.0),
    (["2"] * 4 + ["3"] * 6, "4", 0.0, 0.0),
    # 2021: unanimous humans and the prediction are both compared stripped only: "Yes." != "yes"
    (["yes"] * 10, "Yes.", 1.0, 0.0),
    (["Yes"] * 10, "yes", 0.0, 0.0),  # unanimous human answers are compared raw (official quirk)
    (["yes."] * 10, "yes", 0.0, 0.0),  # ... punctuation included
    (["yes."] * 3 + ["no"] * 7, "yes", 0.9, 0.9),  # differing: punctuation processed, "yes." -> "yes"
    # "yes!" -> "yes " (a space, never stripped) in 2017; 2021's digit/article step splits it off
    (["yes!"] * 3 + ["no"] * 7, "yes", 0.0, 0.9),
    # 2017: humans keep their article, the prediction loses it; 2021: both lose it
    (["a fish"] * 4 + ["cat"] * 6, "a fish", 0.0, 1.0),
    (["don't"] * 3 + ["no"] * 7, "dont", 0.9, 0.9),
    (["no"] * 3 + ["yes"] * 7, "No!", 0.9, 0.9),
    # 2017: the prediction becomes "well lit", the unanimous humans stay "well-lit"; 2021: both raw
    (["well-lit"] * 10, "well-lit", 0.0, 1.0),
    (["yes\n"] * 10, " yes", 0.0, 1.0),  # 2021 strips the unanimous humans too
    # 2017 judges agreement raw (differing: " yes" is no "yes", 5 "yes" match -> 1); 2021 on the
    # stripped answers (unanimous: "Yes" != "yes" -> 0)
    ([" yes"] * 5 + ["yes"] * 5, "Yes", 1.0, 0.0),
    # differing humans: 2021 turns their number words into digits ("Two" -> "2", 3 of 10 -> 0.9)
    (["Two"] * 3 + ["3"] * 7, "2", 0.0, 0.9),
    # ... and drops their articles ("the dog" -> "dog": 2 of 10 match in 2017, 4 in 2021)
    (["the dog"] * 2 + ["dog"] * 2 + ["cat"] * 6, "dog", 0.6, 1.0),
])
def test_official_accuracy_by_hand(humans, predicted, expected, expected_2021):
    assert official_accuracy(predicted, humans, rule="2017") == pytest.approx(expected, abs=1e-12)
    assert OfficialReference().accuracy_2017(predicted, humans) == pytest.approx(expected, abs=1e-12)
    assert official_accuracy(predicted, humans, rule="2021") == pytest.approx(expected_2021, abs=1e-12)
    assert official_accuracy(predicted, humans) == pytest.approx(expected_2021, abs=1e-12)  # the default rule
    assert OfficialReference().accuracy_2021(predicted, humans) == pytest.approx(expected_2021, abs=1e-12)


def test_official_accuracy_refuses_an_unknown_rule_and_no_humans():
    with pytest.raises(ValueError, match=r"rule: expected one of \('2021', '2017'\), got '2019'"):
        official_accuracy("yes", ["yes"] * 10, rule="2019")
    with pytest.raises(ValueError, match=r"rule: expected one of"):
        evaluate_results(*_official_files(), rule="2019")
    for rule in ("2021", "2017"):
        with pytest.raises(ValueError, match="no human answers"):
            official_accuracy("yes", [], rule=rule)


# Every path of both rules: whitespace to strip, marks dropped or spaced out, a digit,digit comma,
# periods, number words, articles, contractions, case, and answers equal only once normalised.
WORDS = ["yes", "Yes", "yes.", " yes", "yes\n", "yes!", "no", "No!", "2", "two", "Two!", "\ttwo", "a dog",
         "dog", "dog,", "The Dog", "the dog ", "red-white", "red white", "well-lit", "well lit", "dont", "don't",
         "1,000", "1000", "3.5", "x;?y c?d", "t-shirt, red", "an apple\tpie"]


def random_questions(rng: random.Random, n: int) -> list[tuple[str, list[str]]]:
    """(prediction, 10 human answers): a third unanimous, a third of two answers, a third of any."""
    out = []
    for _ in range(n):
        pool = [rng.choice(WORDS)] * 2 if len(out) % 3 == 0 else rng.sample(WORDS, 2) if len(out) % 3 == 1 else WORDS
        humans = [rng.choice(pool) for _ in range(10)]
        predicted = rng.choice(humans) if rng.random() < 0.5 else rng.choice(WORDS)
        out.append((predicted, humans))
    return out


@pytest.mark.parametrize("rule", ["2021", "2017"])
def test_official_accuracy_matches_the_transcription_on_random_questions(rule):
    reference = OfficialReference()
    questions = random_questions(random.Random(1), 600)
    for predicted, humans in questions:
        expected = reference.accuracy(predicted, humans, rule)
        assert official_accuracy(predicted, humans, rule) == expected, (predicted, humans)
        if rule == "2021":  # the default, the fine-tuning's accuracy
            assert official_accuracy(predicted, humans) == expected
    # the questions reach both branches of each rule, and scores other than 0 and 1
    scores = [reference.accuracy(p, h, rule) for p, h in questions]
    assert sum(len(set(h)) == 1 for _, h in questions) >= 150 and sum(len(set(h)) > 1 for _, h in questions) >= 300
    assert {0.0, 1.0} < set(scores) and len(set(scores)) >= 5


def test_the_two_rules_differ_on_many_random_questions():
    reference = OfficialReference()
    questions = random_questions(random.Random(1), 600)
    differ = [(p, h) for p, h in questions if reference.accuracy_2017(p, h) != reference.accuracy_2021(p, h)]
    print(f"{len(differ)} of {len(questions)} random questions score differently under the two rules")
    assert len(differ) >= 150  # 230 of 600 at seed 1
    # and both ways: 2021 scores some higher ("well-lit") and some lower ("Yes" against ten "yes")
    assert any(reference.accuracy_2021(p, h) > reference.accuracy_2017(p, h) for p, h in differ)
    assert any(reference.accuracy_2021(p, h) < reference.accuracy_2017(p, h) for p, h in differ)


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


def test_evaluate_results_by_the_2017_rule_overall_and_per_type():
    scores = evaluate_results(*_official_files(), rule="2017")
    assert scores["overall"] == 63.33  # (1 + 0.6 + 0.3) / 3 = 63.33%
    assert scores["perAnswerType"] == {"yes/no": 80.0, "number": 30.0}
    assert scores["perQuestionType"] == {"is it": 80.0, "how many": 30.0}
    assert scores["perQuestion"] == {1: 100.0, 2: 60.0, 3: 30.0}
    assert scores["rule"] == "2017"


def test_evaluate_results_by_the_2021_rule_overall_and_per_type():
    scores = evaluate_results(*_official_files())  # the default rule
    # question 1: ten "yes" agree, so "Yes" is compared unprocessed: 0; questions 2 and 3 as in 2017
    assert scores["overall"] == 30.0  # (0 + 0.6 + 0.3) / 3
    assert scores["perAnswerType"] == {"yes/no": 30.0, "number": 30.0}
    assert scores["perQuestionType"] == {"is it": 30.0, "how many": 30.0}
    assert scores["perQuestion"] == {1: 0.0, 2: 60.0, 3: 30.0}
    assert scores["rule"] == "2021"


def _random_files(questions: list[tuple[str, list[str]]]):
    types = [("is it", "yes/no"), ("how many", "number"), ("what color", "other")]
    qs = {"questions": [{"question_id": q, "image_id": q // 4, "question": f"q{q}?"} for q in range(len(questions))]}
    annotations = {"annotations": [
        {"question_id": q, "image_id": q // 4, "question_type": types[q % 3][0], "answer_type": types[q % 3][1],
         "multiple_choice_answer": humans[0],
         "answers": [{"answer_id": i + 1, "answer": a, "answer_confidence": "yes"} for i, a in enumerate(humans)]}
        for q, (_, humans) in enumerate(questions)]}
    results = [{"question_id": q, "answer": predicted} for q, (predicted, _) in enumerate(questions)]
    return qs, annotations, results


@pytest.mark.parametrize("rule", ["2021", "2017"])
def test_evaluate_results_matches_the_transcription_on_random_files(rule):
    reference = OfficialReference()
    questions = random_questions(random.Random(2), 300)
    scores = evaluate_results(*_random_files(questions), rule=rule)
    accuracies = [reference.accuracy(p, h, rule) for p, h in questions]
    assert scores["perQuestion"] == {q: round(100 * a, 2) for q, a in enumerate(accuracies)}
    assert scores["overall"] == round(100 * sum(accuracies) / len(accuracies), 2)
    for k, answer_type in enumerate(["yes/no", "number", "other"]):
        assert scores["perAnswerType"][answer_type] == round(100 * sum(accuracies[k::3]) / len(accuracies[k::3]), 2)
    assert scores["rule"] == rule


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
    for rule in ("2021", "2017"):
        with pytest.raises(TaskDataError, match=message):
            evaluate_results(questions, annotations, results, rule=rule)


def _write_files(tmp_path: Path, results, questions=None, annotations=None) -> list[str]:
    if questions is None:
        questions, annotations, _ = _official_files()
    paths = []
    for name, obj in (("questions", questions), ("annotations", annotations), ("results", results)):
        (tmp_path / f"{name}.json").write_text(json.dumps(obj))
        paths += [f"--{name}", str(tmp_path / f"{name}.json")]
    return paths


@pytest.mark.parametrize("rule_args, overall, yes_no, per_question", [
    (["--rule", "2017"], "63.33", "80.00", {"1": 100.0, "2": 60.0, "3": 30.0}),
    ([], "30.00", "30.00", {"1": 0.0, "2": 60.0, "3": 30.0}),  # 2021: "Yes" against ten "yes" scores 0
])
def test_command_prints_the_official_lines_and_writes_out(tmp_path, capsys, rule_args, overall, yes_no, per_question):
    out = tmp_path / "scores.json"
    assert vqa_eval.main(_write_files(tmp_path, _official_files()[2]) + ["--out", str(out)] + rule_args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"Overall Accuracy is: {overall}"
    at = lines.index("Per Answer Type Accuracy is the following:")
    assert lines[at + 1:at + 3] == [f"yes/no : {yes_no}", "number : 30.00"]
    assert "how many : 30.00" in lines
    rule = rule_args[1] if rule_args else "2021"
    assert lines[-2] == f"rule {rule}: {RULE_SOURCES[rule]}" and lines[-1] == f"wrote {out}"
    written = json.loads(out.read_text())
    assert written["overall"] == float(overall) and written["perQuestion"] == per_question
    assert written["rule"] == rule


@pytest.mark.parametrize("rule_args, overall", [([], "100.00"), (["--rule", "2021"], "100.00"),
                                                (["--rule", "2017"], "0.00")])
def test_command_scores_a_unanimous_hyphenated_answer_by_the_rule(tmp_path, capsys, rule_args, overall):
    # ten "well-lit": 2021 compares "well-lit" unprocessed; 2017 turns the prediction into "well lit"
    questions = {"questions": [{"question_id": 7, "image_id": 1, "question": "Is the room lit?"}]}
    annotations = {"annotations": [{
        "question_id": 7, "image_id": 1, "question_type": "is the", "answer_type": "other",
        "multiple_choice_answer": "well-lit",
        "answers": [{"answer_id": i + 1, "answer": "well-lit", "answer_confidence": "yes"} for i in range(10)]}]}
    args = _write_files(tmp_path, [{"question_id": 7, "answer": "well-lit"}], questions, annotations)
    assert vqa_eval.main(args + rule_args) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"Overall Accuracy is: {overall}"


def test_command_refuses_an_unknown_rule(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        vqa_eval.main(_write_files(tmp_path, _official_files()[2]) + ["--rule", "2019"])
    assert exit_info.value.code == 2 and "invalid choice: '2019'" in capsys.readouterr().err


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
