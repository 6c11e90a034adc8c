"""The official VQA v2 evaluation of a results file (the numbers of GT-Vision-Lab/VQA's vqaEval.py).

    python -m jaxmuvla.vqa_eval --questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations v2_mscoco_val2014_annotations.json --results val_results.json --out val_scores.json

Results are in the official format, [{"question_id": ..., "answer": "..."}], one per annotated
question. Prints the accuracies as the official demo does; --out writes them (with each
question's, and the rule) as JSON.

--rule picks the official script's rule: "2021", vqaEval.py as of commit a013f00 (2021-03-11,
the current one, the default), or "2017", as of 458a8b2 (2016-10-08); `jaxmuvla.tasks.vqa`
(`official_accuracy`, `evaluate_results`) implements both and says how they differ.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from jaxmuvla.tasks.vqa import DEFAULT_RULE, RULE_SOURCES, RULES, evaluate_results
from vlcore.errors import InputError


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
        scores = evaluate_results(read_json(args.questions), read_json(args.annotations), read_json(args.results),
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
