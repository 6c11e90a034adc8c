"""µ-VLA pre-training on the training core: the weakly aligned corpus -> a single-stream VisualBERT.

    python -m vlcore.main --config=configs/muvla_world.py --workdir=out/muvla/muvla

Data flow: the corpus (`jaxmuvla.corpus`, built on first use from the config's images and text,
cached) -> its memory-mapped arrays, the last `eval_images` images held out -> batches in the
order of (seed, step) (`vlcore.training.input_order`) -> R-T, R-N, I-S and the ITM curriculum
(`jaxmuvla.objectives`), or U-VisualBERT's round robin -> Orbax checkpoints of the whole model
-> evaluation on the held-out images (`jaxmuvla.pretrain_eval`): each objective's loss with fixed
masks and the gates' numbers (`jaxmuvla.gates`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from jaxmuvla import objectives
from jaxmuvla.corpus import CorpusBuildError, WeaklyAlignedCorpus
from jaxmuvla.model import MuVLA, load_text_tokenizer, muvla_from_text_checkpoint
from vlcore.sentence_encoder import bundled_minilm_path
from vlcore.training.config_check import Rule, int_at_least, is_int, number_in, one_of

log = logging.getLogger(__name__)

ID_KEYS = ("tag_ids", "sentence_ids")
TRAIN_KEYS = ("region_features", "region_boxes", "region_class", "tag_ids", "tag_region", "sentence_ids",
              "phrase_spans", "region_phrase", "region_phrase_cos")
VARIANTS = ("muvla", "round_robin")
# determiners and quantifiers a noun phrase starts with: not counted by p-MRTC's hit rate
FUNCTION_WORDS = ("a", "an", "the", "some", "this", "that", "these", "those", "two", "three", "several", "many")


def objective_settings(config: ml_collections.ConfigDict, steps_per_epoch: int) -> objectives.ObjectiveSettings:
    o = config.objectives
    curriculum = -1 if o.curriculum_epochs < 0 else int(o.curriculum_epochs * steps_per_epoch)
    return objectives.ObjectiveSettings(
        region_tag=o.region_tag, region_phrase=o.region_phrase, image_sentence=o.image_sentence,
        curriculum_steps=curriculum, k=o.k, mlm_rate=o.mlm_rate, region_rate=o.region_rate,
        phrase_rate=o.phrase_rate, feature_loss=o.feature_loss, max_masked=o.max_masked,
        max_masked_regions=o.max_masked_regions, mrc=o.mrc, mrfr=o.mrfr, p_mrtc=o.p_mrtc)


@dataclasses.dataclass
class PretrainTask:
    config: ml_collections.ConfigDict
    build_corpus: bool = True  # False: a missing corpus is an error (e.g. when exporting a trained model)

    def __post_init__(self):
        cfg = self.config
        self.corpus = load_corpus(cfg, build=self.build_corpus)
        if cfg.objectives.k > self.corpus.settings["k"]:
            raise CorpusBuildError(f"config.objectives.k={cfg.objectives.k}, but the corpus at {self.corpus.directory} "
                                   f"holds {self.corpus.settings['k']} sentences per image")
        tokenizer = load_text_tokenizer(cfg.model.init or str(bundled_minilm_path()))
        check_corpus_tokenizer(self.corpus, tokenizer, cfg.model.init or "the bundled all-MiniLM-L6-v2")
        self.vocabulary = task_vocabulary(cfg, self.corpus, tokenizer)
        self.pretrained = muvla_from_text_checkpoint(
            cfg.model.init or None, num_layers=cfg.model.num_layers, feature_dim=self.feature_dim,
            num_classes=len(self.corpus.class_names), max_text_length=self.max_text_length,
            vocabulary=self.vocabulary, box_embeddings=cfg.model.box_embeddings, pooling=cfg.model.pooling,
            dropout=cfg.model.dropout, feature_norm=self.feature_norm() if cfg.model.balance_embeddings else None)
        self.module: MuVLA = self.pretrained.module
        self.tokens = special_tokens(self.pretrained.tokenizer, self.vocabulary, self.module.config.vocab_size)
        n = self.corpus.count
        if not 0 < cfg.eval_images < n:
            raise CorpusBuildError(f"config.eval_images={cfg.eval_images}: expected 1..{n - 1} (the corpus has {n} images)")
        self.train_rows = np.arange(n - cfg.eval_images)
        self.eval_rows = np.arange(n - cfg.eval_images, n)
        self.settings = objective_settings(cfg, len(self.train_rows) // cfg.batch_size)
        self._arrays: dict[str, Any] | None = None

    @property
    def feature_dim(self) -> int:
        return int(self.corpus.arrays["region_features"].shape[-1])

    def feature_norm(self, sample: int = 1024) -> float:
        """The mean norm of the (scaled) region features of the first `sample` training images."""
        rows = np.arange(min(sample, self.corpus.count))
        features = self.scaled(self.corpus.arrays["region_features"][rows])
        valid = self.corpus.arrays["region_class"][rows] >= 0
        return float(np.linalg.norm(features[valid], axis=-1).mean()) if valid.any() else 1.0

    @property
    def max_text_length(self) -> int:
        a = self.corpus.arrays
        return max(int(a["sentence_ids"].shape[-1]), int(a["tag_ids"].shape[-1]) + 2)

    def fingerprint(self) -> dict[str, Any]:
        return {"model": "muvla", "variant": self.config.variant, "network": self.module.describe(),
                "feature_scale": self.config.model.feature_scale,
                "balance_embeddings": self.config.model.balance_embeddings,
                "corpus": self.corpus.manifest_sha256, "objectives": dataclasses.asdict(self.settings),
                "vocabulary": self.vocabulary.describe() if self.vocabulary else "full"}

    def ids(self, ids: np.ndarray) -> np.ndarray:
        """Full-tokenizer ids -> the model's (the restricted vocabulary's when there is one)."""
        return self.vocabulary.map(ids) if self.vocabulary is not None else np.asarray(ids)

    def init_params(self, rng: jax.Array) -> Any:
        return self.pretrained.params  # the text side from the BERT checkpoint, the rest initialised

    def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, step: jax.Array):
        rng, dropout_rng = jax.random.split(rng)
        model = self.module.bind({"params": params}, rngs={"dropout": dropout_rng})
        training = dataclasses.replace(self.settings, dropout=True)  # evaluation keeps the settings' False
        if self.config.variant == "round_robin":
            return objectives.round_robin_loss(model, dict(batch), rng, step, training, self.tokens)
        return objectives.pretraining_loss(model, dict(batch), rng, step, training, self.tokens)

    def scaled(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, np.float32) * np.float32(self.config.model.feature_scale)

    def arrays(self, rows: np.ndarray) -> dict[str, "RowsView"]:
        """The corpus arrays at `rows`, read lazily: token ids in the model's vocabulary, region
        features times config.model.feature_scale."""
        transforms = {**{k: self.ids for k in ID_KEYS}, "region_features": self.scaled}
        return {k: RowsView(self.corpus.arrays[k], rows, transforms.get(k)) for k in TRAIN_KEYS}

    def train_arrays(self) -> Mapping[str, Any]:
        if self._arrays is None:
            self._arrays = self.arrays(self.train_rows)
            if self.config.variant == "round_robin":
                self._arrays["corpus_ids"] = self.ids(corpus_sentences(self, len(self.train_rows)))
        return self._arrays

    def evaluate(self, params: Any) -> dict[str, float]:
        from jaxmuvla.pretrain_eval import evaluate_pretraining

        return evaluate_pretraining(self, jax.device_get(params))


class RowsView:
    """Rows `rows` of a row-addressable array (x[indices]), read when asked for, through `transform`.
    rows may have trailing axes (NLVR2's two images per example): view[i] = base[rows[i]]."""

    def __init__(self, base, rows: np.ndarray, transform=None):
        self.base, self.rows, self.transform = base, np.asarray(rows), transform
        self.shape = (*self.rows.shape, *base.shape[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> np.ndarray:
        out = self.base[self.rows[index]]
        return self.transform(out) if self.transform is not None else out


def check_corpus_tokenizer(corpus: WeaklyAlignedCorpus, tokenizer, checkpoint: str) -> None:
    """The corpus stores word-piece ids of the tokenizer that built it: the model's must be the same size
    (the manifest records no more of it), or those ids name other word pieces."""
    built = corpus.manifest.get("tokenizer")
    if built is not None and len(tokenizer) != built["vocab_size"]:
        raise CorpusBuildError(f"config.model.init {checkpoint}: its tokenizer has {len(tokenizer)} word pieces, but "
                               f"the corpus at {corpus.directory} was tokenised by a {built['name']} of "
                               f"{built['vocab_size']}: its ids would name other word pieces. Start from the "
                               "checkpoint whose tokenizer built the corpus, or rebuild the corpus with "
                               "--text_encoder set to this one")


def task_vocabulary(config: ml_collections.ConfigDict, corpus: WeaklyAlignedCorpus, tokenizer=None):
    """config.model.vocabulary "corpus": the word pieces of the corpus (retrieved sentences, tags, the
    whole text corpus) and of config.model.extra_texts; "full": None (the checkpoint's). tokenizer:
    config.model.init's (loaded when None)."""
    if config.model.vocabulary == "full":
        return None
    from jaxmuvla.sentence_bank import SentenceBank
    from jaxmuvla.vocabulary import Vocabulary, text_ids

    if tokenizer is None:
        tokenizer = load_text_tokenizer(config.model.init or str(bundled_minilm_path()))
    bank = SentenceBank(corpus.bank_directory, corpus.settings["index"])
    rows = np.arange(corpus.count)
    used = [corpus.arrays["sentence_ids"][rows], corpus.arrays["tag_ids"][rows],
            text_ids(tokenizer, bank.text(np.arange(bank.count))), text_ids(tokenizer, list(config.model.extra_texts))]
    return Vocabulary.from_ids(tokenizer, used)


def special_tokens(tokenizer, vocabulary, vocab_size: int) -> objectives.Tokens:
    ids = {name: tokenizer.convert_tokens_to_ids(getattr(tokenizer, f"{name}_token"))
           for name in ("cls", "sep", "mask", "pad")}
    function = [p[0] for p in tokenizer(list(FUNCTION_WORDS), add_special_tokens=False)["input_ids"] if len(p) == 1]
    if vocabulary is not None:
        ids = {name: int(vocabulary.lookup[i]) for name, i in ids.items()}
        unknown = int(vocabulary.lookup[tokenizer.unk_token_id])
        function = [int(vocabulary.lookup[i]) for i in function if int(vocabulary.lookup[i]) != unknown]
    return objectives.Tokens(**ids, vocab_size=vocab_size, function_words=tuple(sorted(set(function))))


def corpus_sentences(task: PretrainTask, count: int) -> np.ndarray:
    """[count, L] word pieces of the text corpus's sentences in corpus order, repeated to `count`
    rows: the round robin's text-only batches, which use no retrieval."""
    from jaxmuvla.sentence_bank import SentenceBank

    bank = SentenceBank(Path(task.corpus.bank_directory), task.corpus.settings["index"])
    length = task.corpus.arrays["sentence_ids"].shape[-1]
    ids = np.arange(count) % bank.count
    tokenizer = task.pretrained.tokenizer
    return np.asarray(tokenizer(bank.text(ids), truncation=True, max_length=length, padding="max_length",
                                return_tensors="np")["input_ids"], np.int32)


def load_corpus(config: ml_collections.ConfigDict, build: bool = True) -> WeaklyAlignedCorpus:
    """The corpus the config names, built first when it is the world's and missing (and `build`)."""
    c = config.corpus
    directory = Path(c.dir)
    if not (directory / "manifest.json").is_file():
        if not build or not c.images.startswith("world:"):
            raise CorpusBuildError(f"config.corpus.dir {directory}: no finished corpus; build it with "
                                   "python -m jaxmuvla.build_corpus")
        from jaxmuvla.build_corpus import main as build

        args = [f"--images={c.images}", f"--encoder={c.encoder}", f"--corpus={c.text}", f"--out={directory}",
                f"--k={c.k}", f"--max_regions={c.max_regions}", f"--max_tokens={c.max_tokens}",
                f"--max_phrases={c.max_phrases}", f"--max_tag_tokens={c.max_tag_tokens}"]
        if c.data_dir:
            args.append(f"--data_dir={c.data_dir}")
        args += [f"--sentences={c.sentences}", f"--match={c.match}"]
        if c.match_threshold is not None:
            args.append(f"--match_threshold={c.match_threshold}")
        from vlcore.training.mesh import process_zero_first

        if process_zero_first(lambda: build(args) if jax.process_index() == 0 else 0, "muvla-corpus") != 0:
            raise CorpusBuildError(f"building the corpus into {directory} failed (see the error above)")
    corpus = WeaklyAlignedCorpus(directory)
    from jaxmuvla.corpus import DEFAULT_MATCH_THRESHOLD

    threshold = DEFAULT_MATCH_THRESHOLD if c.match_threshold is None else c.match_threshold
    expected = {"sentences": c.sentences, "match": c.match, "match_threshold": threshold}
    corpus.check_settings({**expected, "k": c.k, "max_tokens": c.max_tokens, "max_phrases": c.max_phrases,
                           "max_tag_tokens": c.max_tag_tokens,
                           "regions": {**corpus.settings["regions"], "max_regions": c.max_regions}})
    return corpus


def make_task(config: ml_collections.ConfigDict) -> PretrainTask:
    return PretrainTask(config)


def default_config() -> ml_collections.ConfigDict:
    """Every field the µ-VLA pre-training reads, with the embedded world's quick-preset values."""
    c = ml_collections.ConfigDict()
    c.task = "jaxmuvla.pretrain"
    c.name = "muvla"
    c.seed = 0
    c.variant = "muvla"  # or "round_robin" (U-VisualBERT: text-only and image-only batches in turn, no retrieval)
    c.corpus = ml_collections.ConfigDict(dict(
        dir="out/muvla_corpus",  # a finished corpus, or where to build the world's
        images="world:quick:web", encoder="two_tower:out/two_tower", text="tfds:vl_world/quick:text_corpus",
        data_dir="out/tfds", k=10, max_regions=10, max_tokens=32, max_phrases=6, max_tag_tokens=24,
        # "retrieved": the K sentences retrieved by each image's tags (µ-VLA); "aligned": each
        # image's own caption (the paper's upper bound, aligned VLP; world images only)
        sentences="retrieved",
        # tag-phrase matching (jaxmuvla.corpus): "word_vectors" (the paper's: static GloVe vectors),
        # "class_sentence" (the public code's), "attribute_aware" (an extension); the cosine below
        # which a region has no phrase (None: the corpus's default)
        match="word_vectors", match_threshold=ml_collections.config_dict.placeholder(float),
    ))
    c.model = ml_collections.ConfigDict(dict(
        init="",  # a BERT or VisualBERT HF directory; "" = the bundled all-MiniLM-L6-v2
        num_layers=0,  # keep the first n transformer layers of the checkpoint (0 = all)
        # "full": the checkpoint's vocabulary; "corpus": only the word pieces of the corpus and of
        # extra_texts (a closed-vocabulary world: the tied MLM head's cost shrinks with it)
        vocabulary="full",
        extra_texts=[],
        box_embeddings=True,  # µ-VLA's LN(Linear(box5)) on region tokens and tag word pieces
        # region features are multiplied by this on input (and MRFR regresses to the scaled ones):
        # 1 for VinVL's features; the world's unit-norm crops use sqrt(width), about unit scale per
        # dimension, or they would be drowned by the position and token-type embeddings
        feature_scale=1.0,
        # what the image-text head reads: "cls" (VisualBERT: the pooler on [CLS]) or "mean" (the
        # pooler on the mean of every token), for checkpoints whose [CLS] was never trained as a
        # summary (all-MiniLM-L6-v2 was trained through mean pooling: its [CLS] barely changes
        # with the sentence and its pooler is untrained, so ITM starts on a plateau)
        pooling="cls",
        # both encoder dropout rates (BERT's hidden and attention dropout) in training; None: the
        # checkpoint's config.json (0.1 for BERT and MiniLM), 0.0: none
        dropout=ml_collections.config_dict.placeholder(float),
        # start the freshly initialised box embedding and visual projection at the word embeddings'
        # scale (jaxmuvla.model.balance_fresh_embeddings): otherwise a tag word piece is ~95 % box
        balance_embeddings=True,
    ))
    c.objectives = ml_collections.ConfigDict(dict(
        region_tag=True, region_phrase=True, image_sentence=True,
        curriculum_epochs=1.0,  # plain sum for this many epochs, then the ITM weighting; -1 = never
        k=5, mlm_rate=0.15, region_rate=0.15, phrase_rate=0.15, feature_loss="l2", max_masked=6,
        max_masked_regions=4,
        mrc=True, mrfr=True, p_mrtc=True,  # µ-VLA's region losses (MRC, MRFR in R-T; p-MRTC in R-N)
    ))
    c.eval_images = 512  # the corpus's last images, held out
    c.batch_size = 64
    c.num_steps = 600
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", lr=5e-5, warmup_steps=60, schedule="linear", weight_decay=0.01, grad_clip_norm=1.0,
    ))  # the paper: AdamW 5e-5, 10 % warm-up, linear decay
    c.fsdp = 1
    c.log_every = 25
    c.save_every = 200
    c.keep_checkpoints = 2
    c.async_checkpoints = True
    return c


def config_rules(config: ml_collections.ConfigDict) -> list[Rule]:
    o = config.objectives
    return [
        Rule("variant", one_of(*VARIANTS), f"one of {list(VARIANTS)}"),
        Rule("corpus.k", int_at_least(1), "an integer >= 1"),
        Rule("corpus.sentences", one_of("retrieved", "aligned"), "'retrieved' or 'aligned'"),
        Rule("corpus.match", one_of("word_vectors", "class_sentence", "attribute_aware"),
             "'word_vectors', 'class_sentence' or 'attribute_aware'"),
        Rule("objectives.k", lambda v: is_int(v) and 1 <= v <= config.corpus.k,
             f"an integer in [1, corpus.k={config.corpus.k}]"),
        Rule("objectives.region_tag", lambda v: isinstance(v, bool) and (v or o.region_phrase or o.image_sentence),
             "True or False, with at least one of region_tag, region_phrase, image_sentence on"),
        Rule("objectives.mlm_rate", number_in(0.0, 1.0), "a rate in [0, 1]"),
        Rule("objectives.region_rate", number_in(0.0, 1.0), "a rate in [0, 1]"),
        Rule("objectives.phrase_rate", number_in(0.0, 1.0), "a rate in [0, 1]"),
        Rule("objectives.feature_loss", one_of("smooth_l1", "l2"), "'smooth_l1' or 'l2'"),
        Rule("objectives.max_masked", int_at_least(1), "an integer >= 1"),
        Rule("objectives.max_masked_regions", int_at_least(1), "an integer >= 1"),
        Rule("model.num_layers", int_at_least(0), "an integer >= 0 (0 = every layer)"),
        Rule("model.vocabulary", one_of("full", "corpus"), "'full' or 'corpus'"),
        *[Rule(f"objectives.{k}", lambda v: isinstance(v, bool), "True or False") for k in ("mrc", "mrfr", "p_mrtc")],
        Rule("model.box_embeddings", lambda v: isinstance(v, bool), "True or False"),
        Rule("model.balance_embeddings", lambda v: isinstance(v, bool), "True or False"),
        Rule("model.pooling", one_of("cls", "mean"), "'cls' or 'mean'"),
        Rule("model.dropout", lambda v: v is None or (isinstance(v, (int, float)) and 0 <= v < 1),
             "None (the checkpoint's rates) or a rate in [0, 1)"),
        Rule("model.feature_scale", lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0"),
        Rule("eval_images", int_at_least(1), "an integer >= 1"),
    ]
