"""µ-VLA fine-tuning end to end on the tiny world, each reported number recomputed independently:
VQA's accuracy by `python -m jaxmuvla.vqa_eval` from the written results file (the official
format), NLVR2's and VE's from the predicted labels against the task's own labels, RefCOCO+'s by
a numpy IoU of the chosen boxes with the gold ones; the sweep's paired differences from the
per-example scores; a finished run is not trained again. Bad input (a checkpoint of another model,
features of another encoder, images without features, an unknown split, a missing checkpoint):
one clear error each, before anything is written.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from vlcore.errors import InputError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def load_config(name: str, arg: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny world + random frozen two-tower + corpus, and a µ-VLA pre-trained on it for 6 steps."""
    from conftest import make_two_tower_workdir
    from jaxmuvla.pretrain import PretrainTask
    from vlcore.training.loop import train

    tmp = tmp_path_factory.mktemp("muvla_finetune")
    make_two_tower_workdir(tmp / "two_tower", seed=5)
    make_two_tower_workdir(tmp / "other_tower", seed=6)
    base = load_config("muvla_finetune_world", "vqa,tiny")
    p = base.pretrain
    p.corpus.dir, p.corpus.encoder, p.corpus.data_dir = str(tmp / "corpus"), f"two_tower:{tmp / 'two_tower'}", \
        str(tmp / "tfds")
    base.data.data_dir, base.data.cache_dir = str(tmp / "tfds"), str(tmp / "regions")
    pretrain = p.copy_and_resolve_references()
    pretrain.name = "muvla"
    result = train(PretrainTask(pretrain), pretrain, tmp / "pretrain" / "muvla")
    assert int(result.state.step) == pretrain.num_steps
    return types.SimpleNamespace(tmp=tmp, base=base, pretrained=tmp / "pretrain")


def finetune_config(world, task: str, **overrides):
    config = world.base.copy_and_resolve_references()
    config.downstream = task
    for key, value in overrides.items():
        target = config
        *parents, last = key.split(".")
        for part in parents:
            target = target[part]
        target[last] = value
    return config


@pytest.fixture(scope="module")
def sweep(world):
    from jaxmuvla import evaluate_all as E

    runs = world.tmp / "runs"
    rows = [E.run_one(world.base, v, t, 0, world.pretrained, runs / v / t / "seed0")
            for v, t in (("no_pretraining", "vqa"), ("muvla", "vqa"), ("muvla", "nlvr2"), ("muvla", "ve"),
                         ("muvla", "refcoco"))]
    return types.SimpleNamespace(rows=rows, runs=runs, comps=E.comparisons(rows, runs, ["vqa"]))


def scores(run: Path, split: str) -> dict:
    return json.loads((run / "results" / f"{split}.scores.json").read_text())


def test_vqa_accuracy_is_the_official_evaluation_of_the_results_file(world, sweep, capsys):
    from jaxmuvla import vqa_eval

    for row in sweep.rows[:2]:
        results = sweep.runs / row["variant"] / "vqa" / "seed0" / "results"
        answers = json.loads((results / "test.results.json").read_text())
        assert set(answers[0]) == {"question_id", "answer"} and isinstance(answers[0]["answer"], str)
        out = results / "scores_official.json"
        assert vqa_eval.main(["--questions", str(results / "test.questions.json"), "--annotations",
                              str(results / "test.annotations.json"), "--results", str(results / "test.results.json"),
                              "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        official = json.loads(out.read_text())
        assert f"Overall Accuracy is: {official['overall']:.02f}" in printed
        assert official["overall"] == pytest.approx(100 * row["test_accuracy"], abs=0.01)
        for answer_type, accuracy in official["perAnswerType"].items():
            assert accuracy == pytest.approx(100 * row[f"test_accuracy_{answer_type.replace('/', '_')}"], abs=0.01)


def test_nlvr2_ve_and_refcoco_scores_recomputed_from_the_predictions(world, sweep):
    from jaxmuvla.tasks.world import load_world_task

    data = world.base.data.data_dir
    for row in sweep.rows[2:]:
        task = row["task"]
        run = sweep.runs / "muvla" / task / "seed0"
        for split in (("testA", "testB") if task == "refcoco" else ("test",)):
            examples, _ = load_world_task(data, task, "tiny", split)
            written = scores(run, split)
            assert written["ids"] == [i if isinstance(i, (int, str)) else str(i) for i in examples.ids]
            if task == "refcoco":
                chosen, gold = np.asarray(written["predicted"]), np.asarray(examples.labels)
                w = np.clip(np.minimum(chosen[:, 2], gold[:, 2]) - np.maximum(chosen[:, 0], gold[:, 0]), 0, None)
                h = np.clip(np.minimum(chosen[:, 3], gold[:, 3]) - np.maximum(chosen[:, 1], gold[:, 1]), 0, None)
                area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
                hits = (w * h / (area(chosen) + area(gold) - w * h)) > 0.5
            else:
                hits = np.asarray(written["predicted"]) == examples.labels
            assert row[f"{split}_accuracy"] == pytest.approx(hits.mean())
            np.testing.assert_array_equal(np.asarray(written["score"]), hits.astype(float))


def test_paired_difference_and_resume(world, sweep):
    from jaxmuvla import evaluate_all as E

    (comp,) = [c for c in sweep.comps if c["b"] == "no_pretraining"]
    a = np.asarray(scores(sweep.runs / "muvla" / "vqa" / "seed0", "test")["score"])
    b = np.asarray(scores(sweep.runs / "no_pretraining" / "vqa" / "seed0", "test")["score"])
    assert comp["difference"] == pytest.approx(a.mean() - b.mean())
    assert comp["standard_error"] == pytest.approx((a - b).std(ddof=1) / np.sqrt(len(a)))
    done = sweep.runs / "muvla" / "vqa" / "seed0" / "scores.json"
    before = done.stat().st_mtime_ns
    again = E.run_one(world.base, "muvla", "vqa", 0, world.pretrained, done.parent)
    assert again == sweep.rows[1] and done.stat().st_mtime_ns == before  # read back, not retrained
    table = E.markdown(sweep.rows, sweep.comps, ["vqa"], ["no_pretraining", "muvla"])
    assert f"{100 * sweep.rows[1]['test_accuracy']:.1f}" in table


def test_bad_inputs_each_name_what_is_wrong(world, tmp_path):
    from jaxmuvla.finetune import FinetuneTask, RegionTable
    from jaxmuvla.tasks.common import TaskExamples

    muvla = str(world.pretrained / "muvla")
    cases = [
        (finetune_config(world, "vqa", init=muvla, **{"pretrain.model.num_layers": 2}),
         [muvla, "not the model config.pretrain describes"]),
        (finetune_config(world, "vqa", init=str(tmp_path / "nothing")), ["no finished checkpoint"]),
        (finetune_config(world, "ve", eval_splits=["validation"]), ["validation", "dev"]),
        (finetune_config(world, "refcoco", **{"pretrain.corpus.encoder": f"two_tower:{world.tmp / 'other_tower'}"}),
         ["other_tower", "not the one whose region features the pre-training corpus holds"]),
    ]
    for config, needles in cases:
        with pytest.raises(InputError) as e:
            FinetuneTask(config, tmp_path / "w")
        assert all(n in str(e.value) for n in needles), str(e.value)
    assert not (tmp_path / "w").exists()
    table = RegionTable(["a", "b"], np.zeros((2, 3, 4)), np.zeros((2, 3, 5)), np.ones((2, 3), bool))
    examples = TaskExamples("ve", "test", [0, 1], ["x", "y"], [("a",), ("c",)], np.zeros(2, np.int32))
    with pytest.raises(InputError, match=r"ve test: 1 image\(s\) have no region features \(e.g. \['c'\]\)"):
        table.rows(examples)
    assert table.rows(examples.__class__("ve", "test", [0], ["x"], [("b",)], np.zeros(1, np.int32))).tolist() == [[1]]


def test_vqa_answer_vocabulary_cut_keeps_the_questions_and_counts_them(world):
    from jaxmuvla.finetune import FinetuneTask

    task = FinetuneTask(finetune_config(world, "vqa", answers=3), None)
    targets = task.train.arrays["targets"]
    assert targets.shape[1] == 3 == len(task.answers)
    humans = task.train.examples.extras["human_answers"]
    from jaxmuvla.tasks.vqa import normalize_answer

    covered = [any(normalize_answer(h) in task.answers for h in hs) for hs in humans]
    np.testing.assert_array_equal(targets.max(1) > 0, covered)  # outside the 3 answers: all-zero targets
    assert not all(covered)
