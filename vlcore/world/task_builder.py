"""TFDS builder `vl_world_tasks`: the world's downstream tasks (`tfds.load("vl_world_tasks/vqa_quick")`).

Importing this module registers the builder. Nothing is downloaded: every example is computed
from (seed, task, split, index) by `vlcore.world.tasks`, and rebuilds are byte-identical.

Configs `{task}_{size}`: task in vqa, nlvr2, ve, refcoco; size `tiny` (tests, ~40 examples per
split) or `quick` (the main job). Splits: vqa train/val/test, nlvr2 train/dev/test, ve
train/dev/test, refcoco train/val/testA/testB.

Features: the task's fields (below) and per image its key `image_id` (unique across the task's
splits), the 64x64 PNG `image`, the simulated detector's `tags` (bbox, label, confidence,
attributes: as `vl_world`'s) and the true `objects` (bbox, label = coarse class name, colour,
pattern); NLVR2 has one such block per image, `left` and `right`. Boxes are TFDS boxes
(ymin, xmin, ymax, xmax in [0, 1]). An image with several questions is stored with each.
  vqa      question_id, question, question_type, answer_type, answers (10), multiple_choice_answer
  nlvr2    identifier, sentence, label (bool)
  ve       pair_id, hypothesis, gold_label
  refcoco  ref_id, sent_id, sentence, category, bbox (the target's true box)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as _tfds_utils

from vlcore.world import tasks as _tasks
from vlcore.world.examples import IMAGE_SIZE

SIZES = ("tiny", "quick")
# Examples per split (VQA questions, NLVR2 statements, VE hypotheses, RefCOCO+ expressions).
_QUICK = {
    "vqa": {"train": 4000, "val": 500, "test": 1500},
    "nlvr2": {"train": 2000, "dev": 500, "test": 1000},
    "ve": {"train": 3000, "dev": 600, "test": 1500},
    "refcoco": {"train": 3000, "val": 500, "testA": 750, "testB": 750},
}
_TINY_EXAMPLES = 40


@dataclasses.dataclass(eq=False)
class VlWorldTaskConfig(tfds.core.BuilderConfig):
    """One task at one size: examples per split (approximate for refcoco, see `split_examples`)."""

    task: str = "vqa"
    split_examples: tuple[tuple[str, int], ...] = ()
    seed: int = 0


def _configs() -> list[VlWorldTaskConfig]:
    out = []
    for task, sizes in _QUICK.items():
        out.append(VlWorldTaskConfig(name=f"{task}_tiny", description=f"{task}, for tests: ~40 examples per split",
                                     task=task, split_examples=tuple((s, _TINY_EXAMPLES) for s in sizes)))
        out.append(VlWorldTaskConfig(name=f"{task}_quick", description=f"{task} for the main job",
                                     task=task, split_examples=tuple(sizes.items())))
    return out


def _image_features() -> dict:
    return {
        "image_id": tfds.features.Text(),
        "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
        "objects": tfds.features.Sequence({
            "bbox": tfds.features.BBoxFeature(),
            "label": tfds.features.Text(),  # the coarse class name
            "colour": tfds.features.Text(),
            "pattern": tfds.features.Text(),
        }),
        "tags": tfds.features.Sequence({
            "bbox": tfds.features.BBoxFeature(),
            "label": tfds.features.Text(),
            "confidence": np.float32,
            "attributes": tfds.features.Text(),
        }),
    }


def _task_features(task: str) -> dict:
    text = tfds.features.Text
    if task == "vqa":
        return {"question_id": np.int64, "question": text(), "question_type": text(), "answer_type": text(),
                "answers": tfds.features.Sequence(text(), length=_tasks.HUMANS), "multiple_choice_answer": text(),
                **_image_features()}
    if task == "nlvr2":
        return {"identifier": text(), "sentence": text(), "label": np.bool_,
                "left": tfds.features.FeaturesDict(_image_features()),
                "right": tfds.features.FeaturesDict(_image_features())}
    if task == "ve":
        return {"pair_id": text(), "hypothesis": text(), "gold_label": text(), **_image_features()}
    return {"ref_id": np.int64, "sent_id": np.int64, "sentence": text(), "category": text(),
            "bbox": tfds.features.BBoxFeature(), **_image_features()}


class VlWorldTasks(tfds.core.GeneratorBasedBuilder):
    """The world's VQA, NLVR2, VE and RefCOCO+ style tasks (see vlcore.world.tasks)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = _configs()
    DEFAULT_BUILDER_CONFIG_NAME = "vqa_quick"

    @_tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # as vl_world's: TFDS's own lookup needs the `importlib_resources` backport
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__, features=tfds.features.FeaturesDict(_task_features(self.builder_config.task)))

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        cfg: VlWorldTaskConfig = self.builder_config
        return {split: self._generate_examples(split, n) for split, n in cfg.split_examples}

    def _generate_examples(self, split: str, n: int):
        cfg: VlWorldTaskConfig = self.builder_config
        for key, ex in _tasks.split_examples(cfg.seed, cfg.task, split, n):
            yield key, _clip_boxes(ex)


def _clip_boxes(ex: dict) -> dict:
    """BBoxFeature rejects coordinates outside [0, 1] (float rounding of the detector's boxes)."""
    out = dict(ex)
    for block in ("left", "right"):
        if block in out:
            out[block] = _clip_boxes(out[block])
    for seq in ("objects", "tags"):
        if seq in out:
            out[seq] = {**out[seq], "bbox": np.clip(np.asarray(out[seq]["bbox"], np.float64).reshape(-1, 4), 0.0, 1.0)}
    if "bbox" in out:
        out["bbox"] = np.clip(np.asarray(out["bbox"], np.float64), 0.0, 1.0)
    return out


def config_name(task: str, size: str) -> str:
    if task not in _tasks.TASKS or size not in SIZES:
        raise ValueError(f"vl_world_tasks has configs {{task}}_{{size}} with task in {_tasks.TASKS} and size in "
                         f"{SIZES}; got task {task!r}, size {size!r}")
    return f"{task}_{size}"


def task_builder(data_dir: str | Path | None, task: str, size: str = "quick") -> VlWorldTasks:
    """The builder (prepared or not) of `{task}_{size}` under data_dir (None: TFDS's default)."""
    return VlWorldTasks(config=config_name(task, size), data_dir=None if data_dir is None else str(data_dir))


def prepare_task(data_dir: str | Path | None, task: str, size: str = "quick") -> VlWorldTasks:
    """Generates `{task}_{size}` under data_dir if it is not there yet; returns the builder."""
    b = task_builder(data_dir, task, size)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return b
