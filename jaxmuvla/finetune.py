"""Fine-tuning a pre-trained µ-VLA (or its text checkpoint alone) on VQA, NLVR2, SNLI-VE or RefCOCO+.

    python -m vlcore.main --config=configs/muvla_finetune_world.py:vqa --config.init=out/muvla_pretrain_runs/muvla \\
        --workdir=out/muvla_finetune/muvla/vqa

Data flow: the task's splits (`jaxmuvla.tasks`: the real formats, or the embedded world's
`vl_world_tasks` configs) -> region features per image key (VinVL's, or the world's frozen
two-tower on its detector's boxes, cached) -> word pieces in the pre-training vocabulary, extended
by the task's words -> `jaxmuvla.heads.DownstreamModel` on the training core (mesh, Orbax resume,
TensorBoard; dropout at the checkpoint's rate or config.dropout) -> model selection: the val split
(VQA, RefCOCO+: val; NLVR2, VE: dev) scored at every config.eval_every-th step from the checkpoints
the loop saves (`<workdir>/val_curve.json`), the best step's parameters kept (ties: the earlier
step) -> the eval splits scored once, with them, as the official scripts score them: VQA accuracy
min(1, #humans/3) over the 10-choose-9 subsets, NLVR2 / SNLI-VE accuracy, RefCOCO+ hits (the
chosen region's IoU with the gold box > 0.5). The work dir's `results/` holds per split the
per-example scores (for paired comparisons) and, for VQA, the answers in the official results
format `[{"question_id", "answer"}]`. (The loop has no hook between steps, so the val curve is
read from the checkpoints once training is done: the same numbers, at the cost of keeping
num_steps / eval_every checkpoints until then; all but the best and the last are deleted after.)

`config.init` is a µ-VLA pre-training work dir (`config.pretrain` must be the config that trained
it: it rebuilds the model and its vocabulary) or "" for no pre-training: the text checkpoint of
`config.pretrain.model.init` with everything else initialised, the paper's baseline.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxmuvla import pretrain as pretraining
from jaxmuvla.heads import OUTPUTS, DownstreamModel
from jaxmuvla.regions import Regions, RegionSettings
from jaxmuvla.tasks.common import TASKS, TaskDataError, TaskExamples
from vlcore.atomic_files import atomic_output, atomic_write_json
from vlcore.encoders.configs import with_dropout
from vlcore.training.config_check import Rule, int_at_least, number_in, one_of, positive_number

log = logging.getLogger(__name__)

DEFAULT_SPLITS = {  # (train, val, test splits) of the world's configs and of the real datasets' usual files
    "vqa": ("train", "val", ("test",)), "nlvr2": ("train", "dev", ("test",)), "ve": ("train", "dev", ("test",)),
    "refcoco": ("train", "val", ("testA", "testB")),
}
ENCODER_KEYS = ("visual_bert", "box_embedding")


class FinetuneError(TaskDataError):
    """A fine-tuning run that cannot start as configured (checkpoint, data, vocabulary)."""


@dataclasses.dataclass
class RegionTable:
    """Region inputs of every image a task uses: row i is image keys[i]."""

    keys: list[str]
    features: np.ndarray  # [n, R, D] float32
    boxes: np.ndarray  # [n, R, 5]
    mask: np.ndarray  # [n, R] bool

    def rows(self, examples: TaskExamples) -> np.ndarray:
        """[n, images per example] rows of the examples' images; a key without features is an error."""
        index = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in examples.image_keys() if k not in index]
        if missing:
            raise FinetuneError(f"{examples.task} {examples.split}: {len(missing)} image(s) have no region features "
                                f"(e.g. {missing[:3]}); the features file does not cover the annotations")
        return np.array([[index[k] for k in keys] for keys in examples.images], np.int64)


def regions_to_table(keys: list[str], regions: Regions) -> RegionTable:
    return RegionTable(list(keys), regions.features.astype(np.float32), regions.boxes.astype(np.float32),
                       regions.classes >= 0)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of boxes [..., 4] = [x1, y1, x2, y2] (broadcasting)."""
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h
    area = lambda x: np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)  # noqa: E731
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


# --- reading the task ----------------------------------------------------------------------------


def read_split(config: ml_collections.ConfigDict, split: str, answers=None):
    """(TaskExamples, images or None): images are the world's (for region encoding), None for real data."""
    d, task = config.data, config.downstream
    if d.source == "world":
        return _world_split(d.data_dir or None, task, d.world, split, answers)
    files = split_files(d.files).get(split)
    if not files:
        raise FinetuneError(f"config.data.files has no files for split {split!r} (it lists {sorted(split_files(d.files))})")
    if task == "vqa":
        from jaxmuvla.tasks.vqa import read_vqa

        return read_vqa(files[0], files[1] if len(files) > 1 else None, answers=answers, split=split), None
    if task == "nlvr2":
        from jaxmuvla.tasks.nlvr2 import read_nlvr2

        return read_nlvr2(files[0], split), None
    if task == "ve":
        from jaxmuvla.tasks.snli_ve import read_snli_ve

        return read_snli_ve(files[0], split), None
    from jaxmuvla.tasks.refcoco import read_refcoco

    if len(files) != 2:
        raise FinetuneError(f"config.data.files: refcoco split {split!r} needs refs(unc).p,instances.json")
    return read_refcoco(files[0], files[1], split, allow_pickle=d.allow_pickle), None


@functools.lru_cache(maxsize=16)
def _world_split(data_dir, task: str, world: str, split: str, answers):
    """A world task's split, read once per process (a sweep fine-tunes every variant on the same splits)."""
    from jaxmuvla.tasks.world import load_world_task

    return load_world_task(data_dir, task, world, split, answers=answers)


def split_files(spec: str) -> dict[str, list[str]]:
    """"train=a.json,b.json;val=c.json" -> {"train": [a.json, b.json], "val": [c.json]}."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        split, sep, files = part.partition("=")
        if not sep or not files:
            raise FinetuneError(f"config.data.files {spec!r}: expected split=FILE[,FILE];split=FILE...")
        out[split.strip()] = [f.strip() for f in files.split(",")]
    return out


def world_region_table(config, images_by_split: dict[str, Any], class_names, settings: RegionSettings,
                       corpus_encoder: str | None = None) -> RegionTable:
    """Region features of the world task's images (its detector's boxes through the frozen
    two-tower), computed once per (task, world, encoder, settings) and cached as one .npz.
    corpus_encoder: the fingerprint of the encoder that made the pre-training corpus's features;
    another encoder's features would mean nothing to the pre-trained model."""
    from jaxmuvla.regions import world_regions
    from vlcore.frozen_encoders import TwoTowerEncoder

    kind, _, workdir = config.pretrain.corpus.encoder.partition(":")
    if kind != "two_tower":
        raise FinetuneError(f"config.pretrain.corpus.encoder {config.pretrain.corpus.encoder!r}: world tasks need "
                            "two_tower:WORKDIR (the frozen model that made the corpus's region features)")
    encoder = TwoTowerEncoder(Path(workdir))
    if corpus_encoder is not None and encoder.fingerprint() != corpus_encoder:
        raise FinetuneError(f"config.pretrain.corpus.encoder {config.pretrain.corpus.encoder}: this two-tower "
                            f"({encoder.fingerprint()}) is not the one whose region features the pre-training corpus "
                            f"holds ({corpus_encoder}): the task's regions would be in another feature space")
    key = json.dumps({"task": config.downstream, "world": config.data.world, "encoder": encoder.fingerprint(),
                      "settings": dataclasses.asdict(settings), "classes": list(class_names),
                      "splits": sorted(images_by_split)}, sort_keys=True)
    cache = Path(config.data.cache_dir) / f"{config.downstream}_{config.data.world}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return RegionTable([str(k) for k in z["keys"]], z["features"], z["boxes"], z["mask"])
    keys, tables = [], []
    for images in images_by_split.values():
        for start in range(0, len(images.keys), 512):
            batch = {k: v[start:start + 512] for k, v in images.batch.items()}
            tables.append(world_regions(batch, encoder, class_names, settings))
        keys += images.keys
    regions = Regions(*(np.concatenate([getattr(t, f) for t in tables]) for f in ("features", "boxes", "classes",
                                                                                  "confidences")),
                      [w for t in tables for w in t.words], np.concatenate([t.num for t in tables]))
    table = regions_to_table(keys, regions)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(cache) as f:
        np.savez(f, keys=np.asarray(keys), features=table.features, boxes=table.boxes, mask=table.mask)
    return table


def vinvl_region_table(config, keys: list[str], class_names, settings: RegionSettings) -> RegionTable:
    from jaxmuvla.regions import vinvl_regions
    from jaxmuvla.vinvl import DetectionTable

    d = config.data
    table = DetectionTable(d.features, d.predictions, min_confidence=settings.min_confidence,
                           min_area_ratio=settings.min_area_ratio, max_regions=None)
    wanted = set(keys)
    found = {}
    for i in range(len(table)):  # one pass over the detections, keeping the images the task uses
        det = table[i]
        if det.image_id in wanted:
            found[det.image_id] = det
    order = [k for k in keys if k in found]
    return regions_to_table(order, vinvl_regions([found[k] for k in order], class_names, settings))


# --- the task --------------------------------------------------------------------------------------


@dataclasses.dataclass
class SplitArrays:
    examples: TaskExamples
    arrays: dict[str, Any]
    rows: np.ndarray  # each example's region-table rows ([n], NLVR2 [n, 2])


class FinetuneTask:
    """A `vlcore.training.loop.TrainTask`: one downstream task from one initialisation."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path | None = None):
        self.config = cfg = config
        self.workdir = Path(workdir).absolute() if workdir else None
        self.results_dir = Path(cfg.results_dir) if cfg.results_dir else (Path(workdir) / "results" if workdir else None)
        check_selection_settings(cfg)
        train_split = cfg.train_split or DEFAULT_SPLITS[cfg.downstream][0]
        eval_splits = list(cfg.eval_splits) or list(DEFAULT_SPLITS[cfg.downstream][2])
        self.val_split = selection_split(cfg, eval_splits)
        self.pre = pretraining.PretrainTask(cfg.pretrain, build_corpus=True)
        train, train_images = read_split(cfg, train_split)
        if len(train) == 0:
            raise FinetuneError(f"{cfg.downstream} split {train_split!r} is empty")
        answers = train.answers[:cfg.answers] if cfg.downstream == "vqa" else None
        evals = {s: read_split(cfg, s, answers=answers) for s in eval_splits}
        vals = {self.val_split: read_split(cfg, self.val_split, answers=answers)} if self.val_split else {}
        for s, (ex, _) in {**evals, **vals}.items():
            if len(ex) == 0:
                raise FinetuneError(f"{cfg.downstream} split {s!r} is empty")
        if cfg.downstream == "vqa" and len(answers) < len(train.answers):
            train = dataclasses.replace(train, labels=train.labels[:, :cfg.answers], answers=answers)
        self.answers = tuple(answers or ())

        settings = RegionSettings(**self.pre.corpus.settings["regions"])
        class_names = self.pre.corpus.class_names
        if cfg.data.source == "world":
            images = {train_split: train_images, **{s: im for s, (_, im) in {**vals, **evals}.items()}}
            self.regions = world_region_table(cfg, images, class_names, settings,
                                              self.pre.corpus.manifest.get("images", {}).get("encoder"))
        else:
            keys = list(dict.fromkeys(k for ex in [train, *(e for e, _ in {**vals, **evals}.values())]
                                      for k in ex.image_keys()))
            self.regions = vinvl_region_table(cfg, keys, class_names, settings)
        if self.regions.features.shape[-1] != self.pre.feature_dim:
            raise FinetuneError(f"region features are {self.regions.features.shape[-1]} wide, the model takes "
                                f"{self.pre.feature_dim} (the corpus's)")

        from jaxmuvla.vocabulary import text_ids

        tokenizer = self.pre.pretrained.tokenizer
        texts = list(train.texts) + [t for ex, _ in {**vals, **evals}.values() for t in ex.texts]
        self.vocabulary = (self.pre.vocabulary.extended(tokenizer, [text_ids(tokenizer, texts)])
                           if self.pre.vocabulary is not None else None)
        vocab_size = self.vocabulary.size if self.vocabulary is not None else self.pre.module.config.vocab_size
        encoder_cfg = with_dropout(dataclasses.replace(self.pre.module.config, vocab_size=vocab_size), cfg.dropout)
        outputs = len(self.answers) if cfg.downstream == "vqa" else OUTPUTS[cfg.downstream]
        self.module = DownstreamModel(encoder_cfg, cfg.downstream, outputs, self.pre.module.box_embeddings,
                                      self.pre.module.pooling)
        self.train = self.split_arrays(train, for_training=True)
        self.evals = {s: self.split_arrays(ex) for s, (ex, _) in evals.items()}
        self.val = self.split_arrays(vals[self.val_split][0]) if self.val_split else None
        self._forward = jax.jit(self.logits)  # one function object: compiled once per batch shape
        self._encoder = None
        self.encoder_params()  # read and checked now: init_params runs inside jit

    # --- arrays ---

    def token_ids(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(self.pre.pretrained.tokenizer(list(texts), truncation=True, max_length=self.config.max_text_tokens,
                                                       padding="max_length", return_tensors="np")["input_ids"], np.int32)
        pad = self.pre.pretrained.tokenizer.pad_token_id
        mask = ids != pad
        ids = self.vocabulary.map(ids) if self.vocabulary is not None else ids
        return ids.astype(np.int32), mask

    def split_arrays(self, examples: TaskExamples, for_training: bool = False) -> SplitArrays:
        task = examples.task
        rows = self.regions.rows(examples)
        ids, mask = self.token_ids(examples.texts)
        if task == "refcoco":
            gold = np.asarray(examples.labels, np.float32)
            overlap = iou(self.regions.boxes[rows[:, 0], :, :4], gold[:, None, :])
            overlap = np.where(self.regions.mask[rows[:, 0]], overlap, -1.0)
            target = np.where(overlap.max(1) > 0.5, overlap.argmax(1), -1).astype(np.int32)
            if for_training:  # the softmax needs a region that is the object: the others cannot be trained on
                keep = target >= 0
                if (~keep).any():
                    log.info("refcoco %s: %d of %d expressions have no detected region with IoU > 0.5 with the gold "
                             "box; not trained on", examples.split, int((~keep).sum()), len(keep))
                rows, ids, mask, target = rows[keep], ids[keep], mask[keep], target[keep]
            targets = target
        elif task == "vqa":
            targets = np.asarray(examples.labels, np.float32)
        else:
            targets = np.asarray(examples.labels, np.int32)
        if task == "nlvr2":  # the sentence with each image
            ids, mask = np.repeat(ids[:, None], 2, 1), np.repeat(mask[:, None], 2, 1)
        else:
            rows = rows[:, 0]
        scale = lambda x: np.asarray(x, np.float32) * np.float32(self.pre.config.model.feature_scale)  # noqa: E731
        arrays = {"input_ids": ids, "attention_mask": mask,
                  "features": pretraining.RowsView(self.regions.features, rows, scale),
                  "boxes": pretraining.RowsView(self.regions.boxes, rows),
                  "region_mask": pretraining.RowsView(self.regions.mask, rows), "targets": targets}
        return SplitArrays(examples, arrays, rows)

    # --- TrainTask ---

    def fingerprint(self) -> dict[str, Any]:
        c = self.config
        return {"model": "muvla_downstream", "task": c.downstream, "init": str(c.init), "network": dataclasses.asdict(self.module.config), "outputs": self.module.outputs,
                "pretraining": self.pre.fingerprint(), "data": c.data.to_dict(), "max_text_tokens": c.max_text_tokens,
                "vocabulary": self.vocabulary.describe() if self.vocabulary is not None else "full"}

    def init_params(self, rng: jax.Array) -> Any:
        """The head initialised from `rng`; the encoder from the pre-training work dir (or the text
        checkpoint), its word embeddings extended by the task's new word pieces. (Called inside
        jit: the encoder arrives as constants read before.)"""
        encoder = self.encoder_params()
        params = dict(self.module.init(rng, *self.example_inputs())["params"])
        params.update({k: jax.tree.map(jnp.asarray, v) for k, v in encoder.items()})
        return params

    def example_inputs(self) -> tuple[np.ndarray, ...]:
        a = self.train.arrays
        return tuple(np.asarray(a[k][np.arange(1)]) for k in ("input_ids", "attention_mask", "features", "boxes",
                                                             "region_mask"))

    def encoder_params(self) -> dict[str, Any]:
        """The encoder parameters to start from, read once and checked against the model's shapes."""
        if self._encoder is None:
            from jaxmuvla.vocabulary import extend_word_embeddings

            base = self.pretrained_encoder()
            full = source_word_embeddings(self.config.pretrain.model.init)
            base = extend_word_embeddings(base, self.pre.vocabulary, self.vocabulary, full)
            shapes = flatten_dict(jax.eval_shape(lambda: self.module.init(jax.random.key(0), *self.example_inputs()))
                                  ["params"])
            for path, value in flatten_dict(base).items():
                if path not in shapes or shapes[path].shape != np.shape(value):
                    raise FinetuneError(f"{'/'.join(path)}: the pre-trained tensor has shape {np.shape(value)}, the "
                                        f"downstream model {getattr(shapes.get(path), 'shape', 'none')}")
            self._encoder = base
        return self._encoder

    def pretrained_encoder(self) -> dict[str, Any]:
        """The encoder parameters (visual_bert, box_embedding) to start from."""
        expected = {k: v for k, v in self.pre.pretrained.params.items() if k in ENCODER_KEYS}
        if not self.config.init:
            return expected
        from jaxmuvla.export import ExportError, latest_params

        try:
            step, params = latest_params(Path(self.config.init))
        except ExportError as e:
            raise FinetuneError(f"config.init: {e}") from None
        want = {"/".join(p): np.shape(v) for p, v in flatten_dict(self.pre.pretrained.params).items()}
        have = {"/".join(p): np.shape(v) for p, v in flatten_dict(params).items()}
        if want != have:
            differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            raise FinetuneError(f"config.init {self.config.init}: its checkpoint (step {step}) is not the model "
                                f"config.pretrain describes ({len(differ)} tensors differ, e.g. {differ[:3]}): "
                                "pass the config that trained it")
        log.info("fine-tuning from %s, step %d", self.config.init, step)
        return {k: v for k, v in params.items() if k in ENCODER_KEYS}

    def train_arrays(self) -> Mapping[str, Any]:
        return self.train.arrays

    def logits(self, params, batch, dropout_rng: jax.Array | None = None):
        """The head's logits; dropout active only when `dropout_rng` is given (training)."""
        train = {"deterministic": False, "rngs": {"dropout": dropout_rng}} if dropout_rng is not None else {}
        return self.module.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["features"],
                                 batch["boxes"], batch["region_mask"], **train)

    def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, step: jax.Array):
        del step  # no schedule; rng is the step's (dropout)
        logits = self.logits(params, batch, dropout_rng=rng)
        if self.config.downstream == "vqa":  # BCE on the soft scores, summed over answers (as UNITER's)
            loss = optax.sigmoid_binary_cross_entropy(logits, batch["targets"]).sum(-1).mean()
            hit = jnp.take_along_axis(batch["targets"], logits.argmax(-1)[:, None], 1)[:, 0]
        else:
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
            hit = (logits.argmax(-1) == batch["targets"]).astype(jnp.float32)
        return loss, {"train_score": hit.mean()}

    # --- evaluation ---

    def predict(self, params: Any, split: SplitArrays, batch_size: int = 128) -> np.ndarray:
        """Logits of every example of a split, in order (the last batch padded to one compiled shape)."""
        from vlcore.fixed_batches import fixed_batch_indices

        out = []
        for index, real in fixed_batch_indices(len(split.examples), batch_size):
            batch = {k: jnp.asarray(np.asarray(v[index])) for k, v in split.arrays.items() if k != "targets"}
            out.append(np.asarray(self._forward(params, batch))[:real])
        return np.concatenate(out)

    def scores(self, split: SplitArrays, logits: np.ndarray) -> tuple[np.ndarray, list[Any]]:
        """(per-example score as the official metric counts it, the predictions: VQA's answers, RefCOCO+'s
        chosen boxes [x1, y1, x2, y2] (normalised), the others' label indices)."""
        ex = split.examples
        if ex.task == "vqa":
            from jaxmuvla.tasks.vqa import official_accuracy

            predicted = [self.answers[i] for i in logits.argmax(-1)]
            return np.array([official_accuracy(p, h) for p, h in zip(predicted, ex.extras["human_answers"])]), predicted
        chosen = logits.argmax(-1)
        if ex.task == "refcoco":
            boxes = self.regions.boxes[split.rows, chosen, :4]
            return (iou(boxes, np.asarray(ex.labels, np.float32)) > 0.5).astype(np.float64), boxes.tolist()
        return (chosen == np.asarray(ex.labels)).astype(np.float64), chosen.tolist()

    def candidate_steps(self) -> list[int]:
        """The steps model selection compares: every config.eval_every-th and the last."""
        c = self.config
        return sorted({*range(c.eval_every, c.num_steps + 1, c.eval_every), c.num_steps})

    def evaluate(self, params: Any) -> dict[str, float]:
        """Called by the loop once training is done, with the last step's parameters: scores the val
        split at every candidate step (from the checkpoints the loop kept; scores cached in
        <workdir>/val_curve.json, so an interrupted evaluation resumes), takes the best step's
        parameters (ties: the earlier step) and scores the test splits once, with them. Without a val
        split the last step is scored. Then drops every checkpoint but the best and the last."""
        params = jax.device_get(params)
        last = self.config.num_steps
        curve = self.val_curve(params) if self.val is not None else {}
        chosen = best_step(curve) if curve else last
        best = params if chosen == last else self.checkpoint_params(chosen, params)
        metrics = {"best_step": float(chosen)}
        if curve:
            metrics["selected_val_accuracy"] = curve[chosen]
        for name, split in self.evals.items():
            score, predicted = self.scores(split, self.predict(best, split))
            metrics[f"{name}_accuracy"] = float(score.mean())
            if split.examples.task == "vqa":
                types = np.asarray(split.examples.extras["answer_type"])
                for t in sorted(set(types.tolist())):
                    metrics[f"{name}_accuracy_{t.replace('/', '_')}"] = float(score[types == t].mean())
            self.write_results(name, split.examples, score, predicted)
        if curve:
            self.drop_checkpoints(keep={chosen, last})
        return metrics

    def val_curve(self, last_params: Any) -> dict[int, float]:
        """{step: val accuracy} at every candidate step, read from the cache or computed."""
        if self.workdir is None:
            raise FinetuneError("model selection on val reads the run's checkpoints: FinetuneTask needs its work dir")
        path = self.workdir / "val_curve.json"
        curve: dict[int, float] = {}
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("split") == self.val_split:
                curve = {int(s): float(v) for s, v in zip(cached["steps"], cached["val_accuracy"])}
        for step in self.candidate_steps():
            if step in curve:
                continue
            params = last_params if step == self.config.num_steps else self.checkpoint_params(step, last_params)
            curve[step] = float(self.scores(self.val, self.predict(params, self.val))[0].mean())
            if jax.process_index() == 0:
                steps = sorted(curve)
                atomic_write_json(path, {"split": self.val_split, "steps": steps,
                                         "val_accuracy": [curve[s] for s in steps]})
        return {s: curve[s] for s in self.candidate_steps()}

    def checkpoint_params(self, step: int, like: Any) -> Any:
        """The parameters of the loop's checkpoint of `step` (host arrays shaped like `like`)."""
        import orbax.checkpoint as ocp

        manager = ocp.CheckpointManager(self.workdir / "checkpoints")
        try:
            if step not in manager.all_steps():
                raise FinetuneError(f"{self.workdir}: no checkpoint of step {step} to score on "
                                    f"{self.val_split} (kept: {sorted(manager.all_steps())}); the loop must keep "
                                    "every config.eval_every-th step until the end (config.keep_checkpoints)")
            item = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, like)}
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
            restored = manager.restore(step, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                         partial_restore=True))
        finally:
            manager.close()
        return restored["params"]

    def drop_checkpoints(self, keep: set[int]) -> None:
        """Deletes the checkpoints selection no longer needs (a sweep keeps dozens of runs)."""
        import orbax.checkpoint as ocp

        manager = ocp.CheckpointManager(self.workdir / "checkpoints")
        try:
            for step in manager.all_steps():
                if step not in keep:
                    manager.delete(step)
        finally:
            manager.close()

    def write_results(self, split: str, examples: TaskExamples, score: np.ndarray, predicted: list[Any]) -> None:
        if self.results_dir is None or jax.process_index() != 0:
            return
        self.results_dir.mkdir(parents=True, exist_ok=True)
        ids = [i if isinstance(i, (int, str)) else str(i) for i in examples.ids]
        atomic_write_json(self.results_dir / f"{split}.scores.json",
                          {"ids": ids, "score": score.tolist(), "predicted": predicted})
        if examples.task == "vqa":  # the official results format
            atomic_write_json(self.results_dir / f"{split}.results.json",
                              [{"question_id": i, "answer": a} for i, a in zip(ids, predicted)])
            if self.config.data.source == "world":  # its questions and annotations too: vqa_eval scores them
                from jaxmuvla.tasks.vqa import write_vqa_files

                write_vqa_files(examples, self.results_dir / f"{split}.questions.json",
                                self.results_dir / f"{split}.annotations.json")


def best_step(curve: Mapping[int, float]) -> int:
    """The step with the highest val score; ties go to the earlier step."""
    return min(curve, key=lambda step: (-curve[step], step))


def selection_split(config: ml_collections.ConfigDict, eval_splits: list[str]) -> str | None:
    """The split model selection reads (None: no selection, the last step is scored).

    config.val_split "" = the task's usual val/dev split; for real data only when config.data.files
    has it and it is not a reported split (the real configs report on val where the test labels are
    hidden). "none" = no selection. A split that is also reported is refused: selecting on it would
    be selecting on the test."""
    name = config.val_split
    if name == "none":
        return None
    usual = DEFAULT_SPLITS[config.downstream][1]
    if not name:
        if config.data.source != "world" and (usual in eval_splits or usual not in split_files(config.data.files)):
            log.info("%s: no val split apart from the reported ones: the last step is scored", config.downstream)
            return None
        name = usual
    if name in eval_splits:
        raise FinetuneError(f"config.val_split {name!r} is also a reported split (config.eval_splits {eval_splits}): "
                            "model selection on it would select on the test; pick another split or val_split=none")
    return name


def check_selection_settings(config: ml_collections.ConfigDict) -> None:
    """Selection scores the checkpoints the loop keeps: it must save every eval_every-th step and keep
    them all until the end."""
    c = config
    saves = -(-c.num_steps // c.save_every)
    if c.val_split != "none" and (c.eval_every % c.save_every or c.keep_checkpoints < saves):
        raise FinetuneError(f"config.eval_every={c.eval_every}, save_every={c.save_every}, keep_checkpoints="
                            f"{c.keep_checkpoints}: model selection scores the loop's checkpoints, so save_every must "
                            f"divide eval_every and keep_checkpoints be >= {saves} (num_steps / save_every, rounded "
                            "up); or val_split=none")


def source_word_embeddings(init: str) -> np.ndarray:
    """The text checkpoint's whole [vocab, H] word-embedding table."""
    from vlcore.hf_checkpoint import read_tensors
    from vlcore.sentence_encoder import bundled_minilm_path

    tensors = read_tensors(Path(init or bundled_minilm_path()))
    keys = [k for k in tensors if k.endswith("embeddings.word_embeddings.weight")]
    if len(keys) != 1:
        raise FinetuneError(f"{init or 'the bundled MiniLM'}: expected one word-embedding table, found {keys}")
    return tensors[keys[0]]


def make_task(config: ml_collections.ConfigDict, workdir: str | Path | None = None) -> FinetuneTask:
    return FinetuneTask(config, workdir)


def default_config() -> ml_collections.ConfigDict:
    """Every field fine-tuning reads, with the embedded world's values."""
    c = ml_collections.ConfigDict()
    c.task = "jaxmuvla.finetune"
    c.name = "finetune"
    c.seed = 0
    c.downstream = "vqa"  # vqa | nlvr2 | ve | refcoco
    c.init = ""  # a µ-VLA pre-training work dir; "" = no pre-training (config.pretrain.model.init alone)
    c.pretrain = pretraining.default_config()  # the config that trained `init`
    c.data = ml_collections.ConfigDict(dict(
        source="world",  # "world": vl_world_tasks/<downstream>_<world>; "real": the files below
        world="quick", data_dir="out/tfds",
        cache_dir="out/muvla_task_regions",  # the world tasks' region features, computed once
        # real data: split=FILE[,FILE];... (vqa: questions.json,annotations.json; nlvr2 / ve: the jsonl;
        # refcoco: refs(unc).p,instances.json) and VinVL's features.tsv / predictions.tsv
        files="", features="", predictions="",
        allow_pickle=False,  # RefCOCO+'s refs(unc).p is a pickle: read (restricted) only when True
    ))
    c.train_split = ""  # "" = the task's usual (train)
    c.eval_splits = []  # [] = the task's test splits (RefCOCO+: testA, testB)
    # model selection: the val split scored every eval_every steps (from the checkpoints), the best
    # step's parameters scored once on the eval splits. "" = the task's val (VQA, RefCOCO+) or dev
    # (NLVR2, VE) split; "none" = no selection (the last step)
    c.val_split = ""
    c.eval_every = 50
    # learning rates jaxmuvla.evaluate_all tries per (variant, task) with the first seed, choosing by
    # the best val score; () = optimizer.lr alone. A single run (vlcore.main) uses optimizer.lr.
    c.lr_grid = (5e-5, 1e-4, 2e-4)
    c.dropout = ml_collections.config_dict.placeholder(float)  # None = the checkpoint's (0.1 for BERT / MiniLM)
    c.answers = 3129  # VQA: the most common answers of the train split kept as the head's outputs
    c.max_text_tokens = 24
    c.results_dir = ""  # "" = <workdir>/results
    c.batch_size = 32
    c.num_steps = 300
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-4, warmup_steps=30, schedule="linear", weight_decay=0.01, grad_clip_norm=1.0))
    c.fsdp = 1
    c.log_every = 50
    c.save_every = c.get_ref("eval_every")  # selection reads these checkpoints ...
    c.keep_checkpoints = c.get_ref("num_steps") // c.get_ref("save_every") + 1  # ... all kept until the end
    c.async_checkpoints = True
    return c


def config_rules(config: ml_collections.ConfigDict) -> list[Rule]:
    return [
        Rule("downstream", one_of(*TASKS), f"one of {list(TASKS)}"),
        Rule("data.source", one_of("world", "real"), "'world' or 'real'"),
        Rule("answers", int_at_least(1), "an integer >= 1"),
        Rule("max_text_tokens", int_at_least(4), "an integer >= 4"),
        Rule("eval_every", int_at_least(1), "an integer >= 1"),
        Rule("lr_grid", lambda v: all(positive_number(x) for x in v), "a tuple of numbers > 0 (may be empty)"),
        Rule("dropout", lambda v: v is None or number_in(0.0, 0.99)(v), "None (the checkpoint's) or a rate in [0, 1)"),
        *[Rule(f"pretrain.{r.field}", r.ok, r.expected) for r in pretraining.config_rules(config.pretrain)],
    ]
