"""TFDS builder `vl_world`: the procedural world as a dataset (`tfds.load("vl_world/quick", ...)`).

Importing this module registers the builder. Generation needs no network (no download manager
URLs): every example is computed from (seed, split, index), see `vlcore.world.examples`.

Configs: `tiny` (tests, ~100 per split), `quick` (~1 min), `default` (2x quick, ~2 min; the default).
The seed is part of the config (0 for the registered ones); `prepare(..., seed=s)` with s != 0
builds a custom config named e.g. `quick_seed3` (its own directory under data_dir).

Splits: `web`, `memory`, `fusion_train`, `test`, `text_corpus`. A split of size 0 is left out.

Examples are drawn and PNG-encoded in worker subprocesses (one per usable core, at most 8;
`VL_WORLD_WORKERS=n` overrides), while this process does the TFDS encoding and writing; the data
do not depend on the number of workers. The registered configs are byte-identical across builds.

`text_corpus` (the unaligned text of mu-VLA) is a split of the same builder, so one
`tfds.load` call reaches everything. Its examples have only `caption` (the sentence) and
`image_id`; the image fields, which a FeaturesDict cannot leave out, hold an all-zero 64x64
image, `fine_label` = `coarse_label` = -1 and empty `objects`, `relations` and `tags`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as _tfds_utils

from vlcore.world import examples as _examples
from vlcore.world.scenes import DEFAULT_NAME_PROB
from vlcore.world.taxonomy import (  # noqa: F401 - re-exported
    CLASSIFICATION_TEMPLATES,
    class_prompts,
    coarse_names,
    fine_names,
    fine_to_coarse,
)

SPLITS = _examples.SPLITS
IMAGE_SIZE = _examples.IMAGE_SIZE


@dataclasses.dataclass(eq=False)
class VlWorldConfig(tfds.core.BuilderConfig):
    """Split sizes, world seed and the web captions' per-mention fine-name probability."""

    web: int = 0
    memory: int = 0
    fusion_train: int = 0
    test: int = 0
    text_corpus: int = 0
    seed: int = 0
    name_prob: float = DEFAULT_NAME_PROB

    def split_sizes(self) -> dict[str, int]:
        return {s: int(getattr(self, s)) for s in SPLITS}


def _config(name: str, scale: float, description: str, **kw) -> VlWorldConfig:
    base = dict(web=10000, memory=5000, fusion_train=50000, test=1500, text_corpus=5000)
    sizes = {k: int(round(v * scale)) for k, v in base.items()}
    sizes.update(kw)
    return VlWorldConfig(name=name, description=description, **sizes)


# The fusion_train split is large next to the memory, as RECO's training data (web pairs, seen about
# once) is next to the memories it is evaluated with.
QUICK = _config("quick", 1.0, "small world, ~1 min to generate on 2 cores")
DEFAULT = _config("default", 2.0, "the default world (2x quick), ~2 min to generate on 2 cores")
TINY = _config("tiny", 0.0, "for tests: ~100 examples per split",
               web=100, memory=120, fusion_train=90, test=120, text_corpus=100)


class VlWorld(tfds.core.GeneratorBasedBuilder):
    """The procedural vision-language world (see vlcore.world)."""

    VERSION = tfds.core.Version("1.3.0")
    RELEASE_NOTES = {
        "1.0.0": "First version.",
        "1.1.0": "Memory-style captions name the subtype, never its look; fusion_train shows 18 of the 30 subtypes.",
        "1.2.0": "fusion_train has 50,000 pairs in quick (100,000 in default), not 5,000; the `paper` config is gone.",
        "1.3.0": "Detector tags carry attribute words (colour, pattern); nothing else changed.",
    }
    BUILDER_CONFIGS = [QUICK, DEFAULT, TINY]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    @_tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup evaluates `importlib_resources.abc.Traversable` from the separate
        # `importlib_resources` backport, which tensorflow-datasets does not require; this file's
        # path is what it would find.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        fine = tfds.features.ClassLabel(names=fine_names())
        coarse = tfds.features.ClassLabel(names=coarse_names())
        features = tfds.features.FeaturesDict({
            "image_id": np.int64,
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "fine_label": fine,
            "coarse_label": coarse,
            "objects": tfds.features.Sequence({
                "bbox": tfds.features.BBoxFeature(),
                "fine_label": tfds.features.ClassLabel(names=fine_names()),
                "coarse_label": tfds.features.ClassLabel(names=coarse_names()),
                "colour": tfds.features.Text(),
                "pattern": tfds.features.Text(),
            }),
            "relations": tfds.features.Sequence({
                "subject": np.int32,
                "predicate": tfds.features.Text(),
                "object": np.int32,
            }),
            "tags": tfds.features.Sequence({
                "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.Text(),
                "confidence": np.float32,
                "attributes": tfds.features.Text(),  # "red striped": the detector's attribute words
            }),
        })
        return self.dataset_info_from_configs(
            description=__doc__,
            features=features,
            supervised_keys=("image", "fine_label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        cfg: VlWorldConfig = self.builder_config
        # a split of size 0 is left out (TFDS cannot write an empty split)
        return {split: self._generate_examples(split, n) for split, n in cfg.split_sizes().items() if n > 0}

    def _generate_examples(self, split: str, n: int):
        cfg: VlWorldConfig = self.builder_config
        for i, ex in _examples.generate(cfg.seed, split, n, cfg.name_prob):
            ex = dict(ex)
            ex["objects"] = _with_bboxes(ex["objects"])
            ex["tags"] = _with_bboxes(ex["tags"])
            yield i, ex


def _with_bboxes(seq: dict) -> dict:
    out = dict(seq)
    out["bbox"] = np.clip(np.asarray(seq["bbox"], np.float64).reshape(-1, 4), 0.0, 1.0)
    return out


# --- convenience -----------------------------------------------------------------------------


def config_for(config: str | VlWorldConfig = "default", seed: int | None = None) -> str | VlWorldConfig:
    """The registered config name, or a custom config `{name}_seed{seed}` for another seed."""
    if isinstance(config, VlWorldConfig):
        base = config
    else:
        known = {c.name: c for c in VlWorld.BUILDER_CONFIGS}
        if config not in known:
            raise ValueError(f"unknown vl_world config {config!r}; expected one of {sorted(known)}")
        base = known[config]
    if seed is None or int(seed) == base.seed:
        return base.name if base in VlWorld.BUILDER_CONFIGS else base
    return dataclasses.replace(base, name=f"{base.name}_seed{int(seed)}", seed=int(seed))


def builder(data_dir: str | Path | None, config: str | VlWorldConfig = "default", seed: int | None = None) -> VlWorld:
    """The builder (prepared or not) for `config` with `seed` under data_dir (None: TFDS's default)."""
    return VlWorld(config=config_for(config, seed), data_dir=None if data_dir is None else str(data_dir))


def prepare(data_dir: str | Path | None, config: str | VlWorldConfig = "quick", seed: int | None = None) -> VlWorld:
    """Generates the world under data_dir (None: TFDS's default) if it is not there yet; returns the
    builder.

    Class names: `b.info.features["fine_label"].names` (or `fine_names()`).
    """
    b = builder(data_dir, config, seed)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return b
