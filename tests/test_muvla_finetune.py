"""µ-VLA fine-tuning end to end on the tiny world, each reported number recomputed independently:
VQA's accuracy by `python -m jaxmuvla.vqa_eval` from the written results file (the official
format), NLVR2's and VE's from the predicted labels against the task's own labels, RefCOCO+'s by
a numpy IoU of the chosen boxes with the gold ones; the sweep's differences from the per-example
scores; a finished run is not trained again. The protocol: the test predictions are the best val
step's model's (its checkpoint applied again), the val curve is that of the checkpoints, the
learning rate is the grid's best by val, and a run interrupted and resumed selects over the
checkpoints saved before and after the stop. Bad input (a checkpoint of another model, features of another encoder,
images without features, an unknown split, a missing checkpoint, selection on a reported split):
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
    from jaxmuvla import evaluate_all as E

    tmp = tmp_path_factory.mktemp("muvla_finetune")
    make_two_tower_workdir(tmp / "two_tower", seed=5)
    make_two_tower_workdir(tmp / "other_tower", seed=6)
    base = load_config("muvla_finetune_world", "vqa,tiny")
    p = base.pretrain
    p.corpus.dir, p.corpus.encoder, p.corpus.data_dir = str(tmp / "corpus"), f"two_tower:{tmp / 'two_tower'}", \
        str(tmp / "tfds")
    base.data.data_dir, base.data.cache_dir = str(tmp / "tfds"), str(tmp / "regions")
    metrics = E.ensure_pretrained(p, "muvla", tmp / "pretrain" / "muvla")  # trains, keeps its final metrics
    return types.SimpleNamespace(tmp=tmp, base=base, pretrained=tmp / "pretrain", pretrain_metrics=metrics)


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


LR = 1e-4  # the tiny preset's optimizer.lr: the runs outside the learning-rate grid


class StopAt3:
    """Stands in for the loop's SIGTERM handler: "stop" once 3 steps are done."""

    def __init__(self, manager):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def requested(self, step):
        return step >= 3


@pytest.fixture(scope="module")
def sweep(world):
    """muvla on VQA through the whole protocol (the tiny grid's two learning rates, seed 0); the
    other runs at LR. The VE run is interrupted after step 3 and resumed (its task object kept for
    the tests)."""
    from conftest import checkpoint_steps
    from jaxmuvla import evaluate_all as E
    from jaxmuvla.finetune import FinetuneTask
    from vlcore.training import loop

    runs = world.tmp / "runs"
    vqa, grid = E.run_variant_task(world.base, "muvla", "vqa", [0], world.pretrained, runs, report=lambda row: None)
    rows = [E.run_one(world.base, "no_pretraining", "vqa", 0, world.pretrained,
                      E.run_dir(runs, "no_pretraining", "vqa", LR, 0), LR), *vqa,
            *(E.run_one(world.base, "muvla", t, 0, world.pretrained, E.run_dir(runs, "muvla", t, LR, 0), LR)
              for t in ("nlvr2", "refcoco"))]
    ve_dir = E.run_dir(runs, "muvla", "ve", LR, 0)
    config = E.finetune_config(world.base, "muvla", "ve", 0, world.pretrained / "muvla", LR)
    ve = FinetuneTask(config, ve_dir)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(loop, "PreemptionSignal", StopAt3)
        first = loop.train(ve, config, ve_dir)
    interrupted = {"preempted": first.preempted, "steps": checkpoint_steps(ve_dir),
                   "curve": (ve_dir / "val_curve.json").exists()}
    metrics = loop.train(ve, config, ve_dir).final_metrics
    rows.append({"variant": "muvla", "task": "ve", "seed": 0, "lr": LR, **metrics, "best_step": int(metrics["best_step"]),
                 "val_curve": json.loads((ve_dir / "val_curve.json").read_text())})
    return types.SimpleNamespace(rows=rows, runs=runs, grid=grid, comps=E.comparisons(rows, runs, ["vqa"], 2000),
                                 ve=ve, interrupted=interrupted)


def scores(run: Path, split: str) -> dict:
    return json.loads((run / "results" / f"{split}.scores.json").read_text())


def run_of(sweep, row) -> Path:
    from jaxmuvla import evaluate_all as E

    return E.run_dir(sweep.runs, row["variant"], row["task"], row["lr"], row["seed"])


def test_vqa_accuracy_is_the_official_evaluation_of_the_results_file(world, sweep, capsys):
    from jaxmuvla import vqa_eval

    for row in sweep.rows[:2]:
        results = run_of(sweep, row) / "results"
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
        run = run_of(sweep, row)
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


def test_differences_lr_choice_gates_and_resume(world, sweep):
    from jaxmuvla import evaluate_all as E

    (comp,) = [c for c in sweep.comps if c["b"] == "no_pretraining"]
    muvla, none = sweep.rows[1], sweep.rows[0]
    a = np.asarray(scores(run_of(sweep, muvla), "test")["score"])
    b = np.asarray(scores(run_of(sweep, none), "test")["score"])
    assert comp["difference"] == pytest.approx(a.mean() - b.mean())
    assert comp["ci_low"] <= comp["difference"] <= comp["ci_high"] and comp["seeds_a"] == [0] == comp["seeds_b"]

    # the learning rate: the grid value whose seed-0 run has the best val score (read from its own curve)
    grid = list(world.base.lr_grid)
    best_val = [max(json.loads((E.run_dir(sweep.runs, "muvla", "vqa", lr, 0) / "val_curve.json").read_text())
                    ["val_accuracy"]) for lr in grid]
    assert sweep.grid["chosen"] == grid[int(np.argmax(best_val))] == muvla["lr"]
    assert [g["val_accuracy"] for g in sweep.grid["grid"]] == pytest.approx(best_val)

    # the pre-training's final metrics were kept for the gates; a second call reads them back
    saved = world.pretrained / "muvla" / E.PRETRAIN_METRICS
    same = lambda x, y: json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)  # noqa: E731 (NaN-safe)
    assert same(json.loads(saved.read_text())["metrics"], world.pretrain_metrics)
    before = saved.stat().st_mtime_ns
    assert same(E.ensure_pretrained(world.base.pretrain, "muvla", world.pretrained / "muvla"), world.pretrain_metrics)
    assert saved.stat().st_mtime_ns == before
    gates = {"no_pretraining": None, "muvla": E.gate_status(world.pretrain_metrics)}
    table = E.markdown(sweep.rows, sweep.comps, ["vqa"], ["no_pretraining", "muvla"], gates, [sweep.grid])
    assert f"{100 * muvla['test_accuracy']:.1f}" in table
    note = E.gate_note(gates["muvla"])
    assert (note in table) if note else ("| muvla | passed |" in table)

    done = run_of(sweep, muvla) / "scores.json"
    before = done.stat().st_mtime_ns
    again = E.run_one(world.base, "muvla", "vqa", 0, world.pretrained, done.parent, muvla["lr"])
    assert again == muvla and done.stat().st_mtime_ns == before  # read back, not retrained


def test_test_split_is_scored_once_with_the_best_val_steps_parameters(world, sweep):
    """The VE run's val curve is the checkpoints' val accuracy; its test predictions are the best
    step's model's, applied again here to the restored checkpoint."""
    from conftest import restore_state

    task = sweep.ve
    (row,) = [r for r in sweep.rows if r["task"] == "ve"]
    run = run_of(sweep, row)
    curve = json.loads((run / "val_curve.json").read_text())
    assert curve["split"] == "dev" and curve["steps"] == [2, 4, 6] == row["val_curve"]["steps"]
    best = curve["steps"][int(np.argmax(curve["val_accuracy"]))]  # the first maximum: ties to the earlier step
    assert row["best_step"] == best and row["selected_val_accuracy"] == max(curve["val_accuracy"])

    def predictions(step, split):
        params = restore_state(run, step)["params"]
        a = split.arrays
        index = np.arange(len(split.examples))
        logits = task.module.apply({"params": params}, *(np.asarray(a[k][index]) for k in (
            "input_ids", "attention_mask", "features", "boxes", "region_mask")))
        return np.asarray(logits).argmax(-1)

    for step in sorted({best, 6}):
        hits = predictions(step, task.val) == np.asarray(task.val.examples.labels)
        assert curve["val_accuracy"][curve["steps"].index(step)] == pytest.approx(hits.mean())
    test = task.evals["test"]
    written = scores(run, "test")["predicted"]
    np.testing.assert_array_equal(written, predictions(best, test))
    assert row["test_accuracy"] == pytest.approx(np.mean(np.asarray(written) == test.examples.labels))


def test_an_interrupted_run_resumes_and_keeps_its_checkpoints_for_selection(sweep):
    """The VE run stopped after step 3 (checkpoints 2 and 3, nothing scored yet), resumed to 6, and
    selected over 2 (saved before the stop), 4 and 6; afterwards only the best and the last are kept."""
    from conftest import checkpoint_steps

    assert sweep.interrupted == {"preempted": True, "steps": [2, 3], "curve": False}
    (row,) = [r for r in sweep.rows if r["task"] == "ve"]
    assert row["val_curve"]["steps"] == [2, 4, 6]
    assert checkpoint_steps(run_of(sweep, row)) == sorted({row["best_step"], 6})


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
        (finetune_config(world, "refcoco", val_split="testA"), ["val_split 'testA' is also a reported split"]),
        (finetune_config(world, "ve", keep_checkpoints=2), ["keep_checkpoints=2", ">= 3"]),
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
