"""Fine-tuning a pre-trained µ-VLA (or its text checkpoint alone) on VQA, NLVR2, SNLI-VE or RefCOCO+.

    python -m vlcore.main --config=configs/muvla_finetune_world.py:vqa --config.init=out/muvla_pretrain_runs/muvla \\
        --workdir=out/muvla_finetune/muvla/vqa

Data flow: the task's splits (`jaxmuvla.tasks`: the real formats, or the embedded world's
`vl_world_tasks` configs) -> region features per image key (VinVL's, or the world's frozen
two-tower on its detector's boxes, cached) -> word pieces in the pre-training vocabulary, extended
by the task's words -> `jaxmuvla.heads.DownstreamModel` on the training core (mesh, Orbax resume,
TensorBoard) -> evaluation on the eval splits as the official scripts score them: VQA accuracy
min(1, #humans/3) over the 10-choose-9 subsets, NLVR2 / SNLI-VE accuracy, RefCOCO+ hits (the
chosen region's IoU with the gold box > 0.5). The work dir's `results/` holds per split the
per-example scores (for paired comparisons) and, for VQA, the answers in the official results
format `[{"question_id", "answer"}]`.

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
from vlcore.training.config_check import Rule, int_at_least, one_of

log = logging.getLogger(__name__)

DEFAULT_SPLITS = {  # (train, eval splits) of the world's configs and of the real datasets' usual files
    "vqa": ("train", ("test",)), "nlvr2": ("train", ("test",)), "ve": ("train", ("test",)),
    "refcoco": ("train", ("testA", "testB")),
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
                      "settings": dataclasses.asdict(settings), "classes": list(class_names)}, sort_keys=True)
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
        self.results_dir = Path(cfg.results_dir) if cfg.results_dir else (Path(workdir) / "results" if workdir else None)
        self.pre = pretraining.PretrainTask(cfg.pretrain, build_corpus=True)
        train_split = cfg.train_split or DEFAULT_SPLITS[cfg.downstream][0]
        eval_splits = list(cfg.eval_splits) or list(DEFAULT_SPLITS[cfg.downstream][1])
        train, train_images = read_split(cfg, train_split)
        if len(train) == 0:
            raise FinetuneError(f"{cfg.downstream} split {train_split!r} is empty")
        answers = train.answers[:cfg.answers] if cfg.downstream == "vqa" else None
        evals = {s: read_split(cfg, s, answers=answers) for s in eval_splits}
        for s, (ex, _) in evals.items():
            if len(ex) == 0:
                raise FinetuneError(f"{cfg.downstream} split {s!r} is empty")
        if cfg.downstream == "vqa" and len(answers) < len(train.answers):
            train = dataclasses.replace(train, labels=train.labels[:, :cfg.answers], answers=answers)
        self.answers = tuple(answers or ())

        settings = RegionSettings(**self.pre.corpus.settings["regions"])
        class_names = self.pre.corpus.class_names
        if cfg.data.source == "world":
            images = {train_split: train_images, **{s: im for s, (_, im) in evals.items()}}
            self.regions = world_region_table(cfg, images, class_names, settings,
                                              self.pre.corpus.manifest.get("images", {}).get("encoder"))
        else:
            keys = list(dict.fromkeys(k for ex in [train, *(e for e, _ in evals.values())] for k in ex.image_keys()))
            self.regions = vinvl_region_table(cfg, keys, class_names, settings)
        if self.regions.features.shape[-1] != self.pre.feature_dim:
            raise FinetuneError(f"region features are {self.regions.features.shape[-1]} wide, the model takes "
                                f"{self.pre.feature_dim} (the corpus's)")

        from jaxmuvla.vocabulary import text_ids

        tokenizer = self.pre.pretrained.tokenizer
        texts = list(train.texts) + [t for ex, _ in evals.values() for t in ex.texts]
        self.vocabulary = (self.pre.vocabulary.extended(tokenizer, [text_ids(tokenizer, texts)])
                           if self.pre.vocabulary is not None else None)
        vocab_size = self.vocabulary.size if self.vocabulary is not None else self.pre.module.config.vocab_size
        encoder_cfg = dataclasses.replace(self.pre.module.config, vocab_size=vocab_size)
        outputs = len(self.answers) if cfg.downstream == "vqa" else OUTPUTS[cfg.downstream]
        self.module = DownstreamModel(encoder_cfg, cfg.downstream, outputs, self.pre.module.box_embeddings,
                                      self.pre.module.pooling)
        self.train = self.split_arrays(train, for_training=True)
        self.evals = {s: self.split_arrays(ex) for s, (ex, _) in evals.items()}
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

    def logits(self, params, batch):
        return self.module.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["features"],
                                 batch["boxes"], batch["region_mask"])

    def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, step: jax.Array):
        del rng, step  # no dropout, no schedule
        logits = self.logits(params, batch)
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
        n = len(split.examples)
        batch_size = min(batch_size, n)
        forward = jax.jit(self.logits)
        out = []
        for start in range(0, n, batch_size):
            index = np.resize(np.arange(start, min(start + batch_size, n)), batch_size)
            batch = {k: jnp.asarray(np.asarray(v[index])) for k, v in split.arrays.items() if k != "targets"}
            out.append(np.asarray(forward(params, batch))[:min(batch_size, n - start)])
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

    def evaluate(self, params: Any) -> dict[str, float]:
        params = jax.device_get(params)
        metrics = {}
        for name, split in self.evals.items():
            score, predicted = self.scores(split, self.predict(params, split))
            metrics[f"{name}_accuracy"] = float(score.mean())
            if split.examples.task == "vqa":
                types = np.asarray(split.examples.extras["answer_type"])
                for t in sorted(set(types.tolist())):
                    metrics[f"{name}_accuracy_{t.replace('/', '_')}"] = float(score[types == t].mean())
            self.write_results(name, split.examples, score, predicted)
        return metrics

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
    c.answers = 3129  # VQA: the most common answers of the train split kept as the head's outputs
    c.max_text_tokens = 24
    c.results_dir = ""  # "" = <workdir>/results
    c.batch_size = 32
    c.num_steps = 300
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-4, warmup_steps=30, schedule="linear", weight_decay=0.01, grad_clip_norm=1.0))
    c.fsdp = 1
    c.log_every = 50
    c.save_every = 300
    c.keep_checkpoints = 1
    c.async_checkpoints = True
    return c


def config_rules(config: ml_collections.ConfigDict) -> list[Rule]:
    return [
        Rule("downstream", one_of(*TASKS), f"one of {list(TASKS)}"),
        Rule("data.source", one_of("world", "real"), "'world' or 'real'"),
        Rule("answers", int_at_least(1), "an integer >= 1"),
        Rule("max_text_tokens", int_at_least(4), "an integer >= 4"),
        *[Rule(f"pretrain.{r.field}", r.ok, r.expected) for r in pretraining.config_rules(config.pretrain)],
    ]
