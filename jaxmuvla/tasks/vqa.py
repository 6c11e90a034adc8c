"""VQA v2: the questions and annotations files, the answer vocabulary, soft targets and the official accuracy.

The accuracy is the official evaluation's (GT-Vision-Lab/VQA,
PythonEvaluationTools/vqaEvaluation/vqaEval.py), quirks included, so that numbers compare with
published ones. That script has scored by two rules, which differ only in which answers get
`process_punctuation` then `process_digit_article`; `rule` picks one:
- "2021" (the default): vqaEval.py as of commit a013f00 (2021-03-11, "Fixed processing answers
  bug"), the current one. Every answer, human or predicted, is stripped (newlines and tabs to
  spaces first). If the stripped human answers differ, the humans' answers and the prediction
  are all processed; if they all agree, all are compared as stripped only ("well-lit" matches
  ten "well-lit"; "Yes" does not match ten "yes").
- "2017": vqaEval.py as of commit 458a8b2 (2016-10-08), unchanged in the VQA v2 release
  (a4f1afd, 2017-10-02) and until 2021. The prediction is always stripped and processed; the
  human answers are compared raw if they all agree, and get `process_punctuation` only (no
  lower-casing, no number words, no articles) when they differ ("well-lit" against ten
  "well-lit" scores 0).
Under both, a question scores the mean, over each human answer left out in turn, of
min(1, #other humans matching / 3) (2 of 10 humans agreeing -> 0.6, 3 -> 0.9, 4 -> 1).
The training targets are the soft scores of the µ-VLA / VisualBERT heads: min(1, #humans / 3).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np

from jaxmuvla.tasks.common import TaskDataError, TaskExamples
from jaxmuvla.tasks.json_files import field, object_list, read_json

log = logging.getLogger(__name__)

VQA_ANSWERS = 3129  # the answer vocabulary of the VisualBERT / µ-VLA VQA heads
ANSWER_TYPES = ("yes/no", "number", "other")
RULES = ("2021", "2017")  # the official accuracy's rules (see the module docstring)
DEFAULT_RULE = "2021"
RULE_SOURCES = {"2021": "vqaEval.py as of a013f00, 2021-03-11", "2017": "vqaEval.py as of 458a8b2, 2016-10-08"}

# The official evaluation's tables, entry for entry (vqaEval.py). Its capitalised keys ("Im",
# "Ive", "Id've", "I'dve") never match, since words are lower-cased first; kept so results agree.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
# The official pattern: its "(?!<=\d)" is a look-ahead (a typo for a look-behind) that always
# holds at a period, so it removes every period not followed by a digit ("yes." -> "yes", "3.5" kept).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The official code passes re.UNICODE (= 32) where `sub` takes its count: at most 32 periods go.
PERIOD_STRIP_COUNT = 32


def process_punctuation(text: str) -> str:
    """The official processPunctuation: drop or space out each punctuation mark, drop periods."""
    # Decided per mark on the *input* text, as the original: a mark touching a space, or any mark
    # of a text with a digit,digit comma, is dropped; otherwise it becomes a space.
    drop_every_mark = COMMA_STRIP.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if drop_every_mark or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official processDigitArticle: lower-case, number words to digits, no articles, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")


def strip_answer(text: str) -> str:
    """An answer as the official evaluation strips it: newlines and tabs to spaces, then `str.strip`."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """A predicted answer as the official evaluation compares it ("Two Dogs!" -> "2 dogs")."""
    return process_digit_article(process_punctuation(strip_answer(text)))


def official_accuracy(predicted: str, human_answers: Sequence[str], rule: str = DEFAULT_RULE) -> float:
    """One question's official VQA accuracy in [0, 1] under `rule` ("2021" or "2017", see the module
    docstring): the 10-choose-9 average of min(1, matches / 3)."""
    _check_rule(rule)
    if not human_answers:
        raise ValueError("official_accuracy: no human answers")
    if rule == "2017":
        prediction = normalize_answer(predicted)
        humans = list(human_answers)
        if len(set(humans)) > 1:  # the 2017 quirk: unanimous answers are compared raw
            humans = [process_punctuation(h) for h in humans]
    else:
        prediction = strip_answer(predicted)
        humans = [strip_answer(h) for h in human_answers]
        if len(set(humans)) > 1:  # agreement is judged on the stripped answers
            prediction = normalize_answer(prediction)
            humans = [normalize_answer(h) for h in humans]
    matches = sum(h == prediction for h in humans)
    # leaving human i out: the others that match are all matches, less i's own if it matched
    return sum(min(1, (matches - (h == prediction)) / 3) for h in humans) / len(humans)


def parse_questions(obj: Any, source: str | os.PathLike) -> list[dict[str, Any]]:
    """A questions file's records {question_id, image_id, question}, checked, in file order."""
    records, seen = [], set()
    for i, q in enumerate(object_list(obj, "questions", source)):
        at = f"{source}: questions[{i}]"
        qid = field(q, "question_id", int, at)
        at = f"{at} (question_id {qid})"
        if qid in seen:
            raise TaskDataError(f"{at}: question_id appears twice")
        seen.add(qid)
        records.append({"question_id": qid, "image_id": field(q, "image_id", int, at),
                        "question": field(q, "question", str, at)})
    return records


def parse_annotations(obj: Any, source: str | os.PathLike) -> list[dict[str, Any]]:
    """An annotations file's records, checked; "answers" becomes the list of the human answers' strings."""
    records, seen = [], set()
    for i, a in enumerate(object_list(obj, "annotations", source)):
        at = f"{source}: annotations[{i}]"
        qid = field(a, "question_id", int, at)
        at = f"{at} (question_id {qid})"
        if qid in seen:
            raise TaskDataError(f"{at}: question_id annotated twice")
        seen.add(qid)
        answer_type = field(a, "answer_type", str, at)
        if answer_type not in ANSWER_TYPES:
            raise TaskDataError(f"{at}: field 'answer_type' is {answer_type!r}, expected one of {ANSWER_TYPES}")
        humans = field(a, "answers", list, at)
        if not humans:
            raise TaskDataError(f"{at}: field 'answers' is empty, expected the human answers")
        records.append({
            "question_id": qid, "image_id": field(a, "image_id", int, at),
            "question_type": field(a, "question_type", str, at), "answer_type": answer_type,
            "multiple_choice_answer": field(a, "multiple_choice_answer", str, at),
            "answers": [field(h, "answer", str, f"{at}: answers[{j}]") for j, h in enumerate(humans)],
        })
    return records


def annotations_by_question(questions: list[dict[str, Any]], annotations: list[dict[str, Any]],
                            source: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """{question_id: annotation}, each annotation checked against its question."""
    image_of = {q["question_id"]: q["image_id"] for q in questions}
    for a in annotations:
        qid = a["question_id"]
        if qid not in image_of:
            raise TaskDataError(f"{source}: question_id {qid} is annotated but not in the questions file")
        if a["image_id"] != image_of[qid]:
            raise TaskDataError(f"{source}: question_id {qid}: field 'image_id' is {a['image_id']}, "
                                f"its question's is {image_of[qid]}")
    return {a["question_id"]: a for a in annotations}


def parse_results(obj: Any, source: str | os.PathLike) -> dict[int, str]:
    """{question_id: answer} of a results file in the official format [{question_id, answer}]."""
    if not isinstance(obj, list):
        raise TaskDataError(f"{source}: expected a JSON list of {{\"question_id\", \"answer\"}}, "
                            f"got {type(obj).__name__}")
    answers: dict[int, str] = {}
    for i, r in enumerate(obj):
        at = f"{source}: results[{i}]"
        qid = field(r, "question_id", int, at)
        if qid in answers:
            raise TaskDataError(f"{at}: question_id {qid} appears twice")
        answers[qid] = field(r, "answer", str, f"{at} (question_id {qid})")
    return answers


def _examples_of(ids: Iterable[int], limit: int = 3) -> str:
    ids = sorted(ids)
    return ", ".join(map(str, ids[:limit])) + (", ..." if len(ids) > limit else "")


def _percent(accuracies: list[float]) -> float:
    return round(100 * float(sum(accuracies)) / len(accuracies), 2)  # the official expression, in its order


def evaluate_results(questions: Any, annotations: Any, results: Any, *, rule: str = DEFAULT_RULE,
                     sources: tuple[str, str, str] = ("questions", "annotations", "results")) -> dict[str, Any]:
    """The official evaluation of parsed questions / annotations / results files under `rule`.

    Returns {"overall": %, "perQuestionType": {type: %}, "perAnswerType": {type: %},
    "perQuestion": {question_id: %}, "rule": rule}, percentages rounded to 2 places as the
    official script (types in the annotations' order). `sources` name the three inputs in
    error messages.
    """
    _check_rule(rule)  # before the files are parsed
    questions_source, annotations_source, results_source = sources
    records = parse_annotations(annotations, annotations_source)
    annotations_by_question(parse_questions(questions, questions_source), records, annotations_source)
    predicted = parse_results(results, results_source)
    annotated = {a["question_id"] for a in records}
    if set(predicted) != annotated:  # the official loadRes asserts this
        missing, extra = annotated - set(predicted), set(predicted) - annotated
        raise TaskDataError(f"{results_source}: results must answer exactly the annotated questions: "
                            f"{len(missing)} unanswered ({_examples_of(missing)}), "
                            f"{len(extra)} not annotated ({_examples_of(extra)})")
    overall: list[float] = []
    per_question_type: dict[str, list[float]] = {}
    per_answer_type: dict[str, list[float]] = {}
    per_question: dict[int, float] = {}
    for a in records:
        accuracy = official_accuracy(predicted[a["question_id"]], a["answers"], rule)
        overall.append(accuracy)
        per_question_type.setdefault(a["question_type"], []).append(accuracy)
        per_answer_type.setdefault(a["answer_type"], []).append(accuracy)
        per_question[a["question_id"]] = round(100 * accuracy, 2)
    return {"overall": _percent(overall),
            "perQuestionType": {t: _percent(v) for t, v in per_question_type.items()},
            "perAnswerType": {t: _percent(v) for t, v in per_answer_type.items()},
            "perQuestion": per_question, "rule": rule}


def build_answer_vocabulary(annotations: Any, top: int = VQA_ANSWERS) -> tuple[str, ...]:
    """The `top` most frequent normalised `multiple_choice_answer`s, ties in alphabetical order.

    annotations: the annotation records (a file's "annotations" list, or the whole file's object).
    """
    if isinstance(annotations, dict):
        annotations = annotations.get("annotations", [])
    if not isinstance(top, int) or top < 1:
        raise ValueError(f"top: expected a positive int, got {top!r}")
    counts = Counter(normalize_answer(field(a, "multiple_choice_answer", str, f"annotations[{i}]"))
                     for i, a in enumerate(annotations))
    counts.pop("", None)  # an answer that normalises to nothing ("the", "?") is no class
    if not counts:
        raise TaskDataError("annotations: no multiple_choice_answer to build an answer vocabulary from")
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return tuple(answer for answer, _ in ranked[:top])


def soft_scores(human_answers: Sequence[Sequence[str]], answers: Sequence[str]) -> np.ndarray:
    """float32 [n, len(answers)]: min(1, #humans whose normalised answer is that answer / 3)."""
    index = {a: k for k, a in enumerate(answers)}
    if len(index) != len(answers):
        raise ValueError("answers: the vocabulary holds an answer twice")
    scores = np.zeros((len(human_answers), len(answers)), np.float32)
    for row, humans in enumerate(human_answers):
        for answer, count in Counter(normalize_answer(h) for h in humans).items():
            if answer in index:
                scores[row, index[answer]] = min(1.0, count / 3)
    return scores


def read_vqa(questions_path: str | os.PathLike, annotations_path: str | os.PathLike | None = None,
             answers: Sequence[str] | None = None, split: str = "train") -> TaskExamples:
    """One VQA v2 split (image keys: str(image_id)); without annotations (test-dev) labels are 0.

    answers: the answer vocabulary; None builds it from these annotations (do so on train only,
    and pass train's to the other splits so the head's outputs mean the same answers).
    """
    questions = parse_questions(read_json(questions_path), questions_path)
    n = len(questions)
    if annotations_path is None:
        if answers is None:
            raise TaskDataError(f"{questions_path}: no annotations to build the answer vocabulary from; "
                                "pass the training split's answers")
        answers = _checked_vocabulary(answers)
        labels = np.zeros((n, len(answers)), np.float32)
        extras = {"human_answers": [[] for _ in range(n)], "answer_type": [""] * n, "question_type": [""] * n}
    else:
        records = parse_annotations(read_json(annotations_path), annotations_path)
        by_question = annotations_by_question(questions, records, annotations_path)
        for q in questions:
            if q["question_id"] not in by_question:
                raise TaskDataError(f"{annotations_path}: no annotation for question_id {q['question_id']} "
                                    f"of {questions_path}")
        if answers is None:
            if split != "train":
                log.warning("%s: answer vocabulary built from the %s split; the head's outputs mean "
                            "other answers than train's", annotations_path, split)
            answers = build_answer_vocabulary(records)
        answers = _checked_vocabulary(answers)
        ordered = [by_question[q["question_id"]] for q in questions]
        human_answers = [a["answers"] for a in ordered]
        labels = soft_scores(human_answers, answers)
        extras = {"human_answers": human_answers, "answer_type": [a["answer_type"] for a in ordered],
                  "question_type": [a["question_type"] for a in ordered]}
        unanswerable = int(np.sum(labels.max(axis=1, initial=0.0) == 0))
        log.info("%s: %d of %d questions have no human answer among the %d answers (kept; they score 0)",
                 annotations_path, unanswerable, n, len(answers))
    return TaskExamples(task="vqa", split=split, ids=[q["question_id"] for q in questions],
                        texts=[q["question"] for q in questions],
                        images=[(str(q["image_id"]),) for q in questions],
                        labels=labels, answers=answers, extras=extras)


def _checked_vocabulary(answers: Sequence[str]) -> tuple[str, ...]:
    answers = tuple(answers)
    if not answers or not all(isinstance(a, str) for a in answers):
        raise TaskDataError("answers: expected a non-empty sequence of answer strings")
    if len(set(answers)) != len(answers):
        raise TaskDataError("answers: the vocabulary holds an answer twice")
    return answers


def write_vqa_files(examples: TaskExamples, questions_path: str | os.PathLike,
                    annotations_path: str | os.PathLike) -> None:
    """A split's questions and annotations in VQA v2's JSON formats (for the world's tasks, so
    `python -m jaxmuvla.vqa_eval` scores their results files as it scores the real ones). Image
    ids are the images' positions in first-use order (VQA's are integers)."""
    from vlcore.atomic_files import atomic_write_json

    image_ids = {k: i for i, k in enumerate(examples.image_keys())}
    questions, annotations = [], []
    for i, qid in enumerate(examples.ids):
        image_id = image_ids[examples.images[i][0]]
        humans = list(examples.extras["human_answers"][i])
        questions.append({"question_id": int(qid), "image_id": image_id, "question": examples.texts[i]})
        annotations.append({
            "question_id": int(qid), "image_id": image_id, "question_type": examples.extras["question_type"][i],
            "answer_type": examples.extras["answer_type"][i],
            "multiple_choice_answer": Counter(humans).most_common(1)[0][0],
            "answers": [{"answer_id": j + 1, "answer": a, "answer_confidence": "yes"} for j, a in enumerate(humans)]})
    atomic_write_json(questions_path, {"questions": questions})
    atomic_write_json(annotations_path, {"annotations": annotations})
