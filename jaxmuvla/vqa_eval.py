"""The official VQA v2 evaluation of a results file (the numbers of GT-Vision-Lab/VQA's vqaEval.py).

    python -m jaxmuvla.vqa_eval --questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations v2_mscoco_val2014_annotations.json --results val_results.json --out val_scores.json

Results are in the official format, [{"question_id": ..., "answer": "..."}], one per annotated
question. Prints the accuracies as the official demo does; --out writes them (with each
question's, and the rule) as JSON.

The official script (PythonEvaluationTools/vqaEvaluation/vqaEval.py) has scored by two rules,
which differ only in which answers get `process_punctuation` then `process_digit_article`
(`jaxmuvla.tasks.vqa`); `--rule` picks one:
- "2021" (the default): vqaEval.py as of commit a013f00 (2021-03-11, "Fixed processing answers
  bug"), the current one. Every answer, human or predicted, is stripped (newlines and tabs to
  spaces first). If the stripped human answers differ, the humans' answers and the prediction
  are all processed; if they all agree, all are compared as stripped only ("well-lit" matches
  ten "well-lit"; "Yes" does not match ten "yes").
- "2017": vqaEval.py as of commit 458a8b2 (2016-10-08), unchanged in the VQA v2 release
  (a4f1afd, 2017-10-02) and until 2021. The prediction is always stripped and processed; the
  human answers are compared raw if they all agree, and get `process_punctuation` only when
  they differ ("well-lit" against ten "well-lit" scores 0). `jaxmuvla.tasks.vqa.official_accuracy`
  (the fine-tuning's accuracy) is this rule.
Under both, a question scores the mean, over each human answer left out in turn, of
min(1, #other humans matching / 3).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from vlcore.errors import InputError

RULES = ("2021", "2017")
DEFAULT_RULE = "2021"
RULE_SOURCES = {"2021": "vqaEval.py as of a013f00, 2021-03-11", "2017": "vqaEval.py as of 458a8b2, 2016-10-08"}


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")


def _stripped(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(predicted: str, human_answers: Sequence[str], rule: str = DEFAULT_RULE) -> float:
    """One question's official VQA accuracy in [0, 1] under `rule` ("2021" or "2017", see above)."""
    from jaxmuvla.tasks.vqa import normalize_answer, official_accuracy

    _check_rule(rule)
    if rule == "2017":
        return official_accuracy(predicted, human_answers)
    if not human_answers:
        raise ValueError("vqa_accuracy: no human answers")
    prediction = _stripped(predicted)
    humans = [_stripped(h) for h in human_answers]
    if len(set(humans)) > 1:  # agreement is judged on the stripped answers
        prediction = normalize_answer(prediction)
        humans = [normalize_answer(h) for h in humans]
    matches = sum(h == prediction for h in humans)
    # leaving human i out: the others that match are all matches, less i's own if it matched
    return sum(min(1, (matches - (h == prediction)) / 3) for h in humans) / len(humans)


def _examples_of(ids: set[int], limit: int = 3) -> str:
    ids = sorted(ids)
    return ", ".join(map(str, ids[:limit])) + (", ..." if len(ids) > limit else "")


def _percent(accuracies: list[float]) -> float:
    return round(100 * float(sum(accuracies)) / len(accuracies), 2)  # the official expression, in its order


def evaluate(questions: Any, annotations: Any, results: Any, *, rule: str = DEFAULT_RULE,
             sources: tuple[str, str, str] = ("questions", "annotations", "results")) -> dict[str, Any]:
    """The official evaluation of parsed questions / annotations / results files under `rule`.

    Returns {"overall": %, "perQuestionType": {type: %}, "perAnswerType": {type: %},
    "perQuestion": {question_id: %}, "rule": rule}, percentages rounded to 2 places as the
    official script (types in the annotations' order). `sources` name the three inputs in
    error messages.
    """
    from jaxmuvla.tasks.common import TaskDataError
    from jaxmuvla.tasks.vqa import annotations_by_question, parse_annotations, parse_questions, parse_results

    _check_rule(rule)
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
        accuracy = vqa_accuracy(predicted[a["question_id"]], a["answers"], rule)
        overall.append(accuracy)
        per_question_type.setdefault(a["question_type"], []).append(accuracy)
        per_answer_type.setdefault(a["answer_type"], []).append(accuracy)
        per_question[a["question_id"]] = round(100 * accuracy, 2)
    return {"overall": _percent(overall),
            "perQuestionType": {t: _percent(v) for t, v in per_question_type.items()},
            "perAnswerType": {t: _percent(v) for t, v in per_answer_type.items()},
            "perQuestion": per_question, "rule": rule}


def parse_args(argv: Sequence[str] | None):
    p = argparse.ArgumentParser(prog="python -m jaxmuvla.vqa_eval", description=__doc__.split("\n")[0])
    p.add_argument("--questions", required=True, help="VQA v2 questions JSON")
    p.add_argument("--annotations", required=True, help="VQA v2 annotations JSON of the same split")
    p.add_argument("--results", required=True, help='[{"question_id": ..., "answer": ...}] JSON')
    p.add_argument("--out", default=None, help="JSON file to write the accuracies to")
    p.add_argument("--rule", default=DEFAULT_RULE, choices=RULES,
                   help=f"the official script's answer processing: {RULE_SOURCES['2021']} (2021, the default) "
                        f"or {RULE_SOURCES['2017']} (2017)")
    return p.parse_args(argv)


def print_accuracies(scores: dict) -> None:
    """The official demo's lines ("Overall Accuracy is: 63.12", "yes/no : 80.00", ...)."""
    print(f"Overall Accuracy is: {scores['overall']:.02f}\n")
    print("Per Question Type Accuracy is the following:")
    for question_type, accuracy in scores["perQuestionType"].items():
        print(f"{question_type} : {accuracy:.02f}")
    print("\n")
    print("Per Answer Type Accuracy is the following:")
    for answer_type, accuracy in scores["perAnswerType"].items():
        print(f"{answer_type} : {accuracy:.02f}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from jaxmuvla.tasks.json_files import read_json
    from vlcore.atomic_files import atomic_write_json

    try:
        scores = evaluate(read_json(args.questions), read_json(args.annotations), read_json(args.results),
                          rule=args.rule, sources=(args.questions, args.annotations, args.results))
        if args.out:
            try:
                atomic_write_json(args.out, scores)
            except OSError as e:
                raise InputError(f"--out {args.out}: cannot write ({e.strerror or e})") from None
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_accuracies(scores)
    print(f"\nrule {args.rule}: {RULE_SOURCES[args.rule]}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
