"""µ-VLA's weakly aligned corpus: for every image, its regions, K sentences retrieved by its tags,
the noun phrases of those sentences and the phrase each region matches.

Data flow per shard of images: detections -> regions (`jaxmuvla.regions`) -> the tag query
("red striped fish blue car") -> its sentence embedding -> the K nearest corpus sentences
(`jaxmuvla.sentence_bank`, through any `retrieval.backends` index) -> spaCy noun phrases and
their word-piece spans (`jaxmuvla.phrases`) -> each region's tag against each phrase
(`CorpusSettings.match`) -> one shard of fixed-shape arrays (`vlcore.array_shards`).

Matching rules (`match`), each keeping a region's best phrase only if its cosine is at least
`match_threshold`:
  * "word_vectors" (the default; the seed's rule): the cosine of the region's class word and the
    phrase's closest word, static GloVe vectors (`jaxmuvla.phrases.WordVectors.similarity`);
  * "class_sentence" (µ-VLA's public code): the class word against the phrase, each embedded whole
    by the sentence encoder (MiniLM);
  * "attribute_aware" (an extension, not the paper's): as word_vectors, but the tag is the region's
    detected attribute words with its class word ("red dotted fish"; the similarity is the mean over
    its words), so same-class regions of different looks can match different phrases.

Sentences (`sentences`): "retrieved" (the paper's weak alignment) or "aligned" (the paper's upper
bound, aligned VLP: each image's own caption(s) fill its K slots, repeated in order when it has
fewer than K; `sentence_index` is then -1, as the captions are not in the text corpus).

Output directory::

    settings.json   what determines the bytes (written first; a resume must match it)
    shard-00000/    images [0, images_per_shard): one .npy per array below
    ...
    manifest.json   settings, shards (counts, sha256) and totals; written last

Arrays per image (R regions, K sentences, L word pieces, P phrases, T tag word pieces):

    image_id            str [n]
    region_features     float32 [n, R, D]      (zeros for padding)
    region_boxes        float32 [n, R, 5]      x1/W, y1/H, x2/W, y2/H, area/(W*H)
    region_class        int32 [n, R]           detector class (index into manifest's class_names), -1 = none
    region_conf         float32 [n, R]
    tag_ids             int32 [n, T]           the regions' words as word pieces ([tags] of R-T), 0 = pad
    tag_region          int32 [n, T]           the region each tag word piece belongs to, -1 = pad
    sentence_index      int64 [n, K]           position of the retrieved sentence in the text corpus;
                                               -1 = not from it (sentences="aligned": the image's caption)
    sentence_score      float32 [n, K]         cosine of the tag query and the sentence (sentence embeddings)
    sentence_ids        int32 [n, K, L]        [CLS] sentence [SEP], 0 = pad
    phrase_spans        int32 [n, K, P, 2]     word-piece range [start, end) of each noun phrase, -1 = none
    region_phrase       int32 [n, K, R]        the phrase (index into phrase_spans) region r matches best
                                               in sentence k; -1 = no region or no phrase
    region_phrase_cos   float32 [n, K, R]      that match's similarity under the matching rule, a cosine
                                               (0 where there is none)

Every computation is deterministic and a sentence embedding does not depend on its batch, so a
shard's bytes depend only on its images: an interrupted build resumes to identical shards, and
each JAX process building only its slice of the shards gives, together, the one-process build.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from jaxmuvla.phrases import NounPhraser, WordVectors, best_phrases, wordpiece_spans
from jaxmuvla.regions import Regions, RegionSettings, tag_query, vinvl_regions, world_regions
from jaxmuvla.sentence_bank import SentenceBank
from vlcore.array_shards import SHARD_RE, ConcatenatedRows, ShardInfo, read_shard, shard_name, write_shard
from vlcore.atomic_files import TMP_PREFIX, atomic_write_json, differing_keys
from vlcore.errors import InputError
from vlcore.sentence_encoder import SentenceEncoder

FORMAT_VERSION = 1
SETTINGS_NAME, MANIFEST_NAME = "settings.json", "manifest.json"
ARRAYS = ("image_id", "region_features", "region_boxes", "region_class", "region_conf", "tag_ids", "tag_region",
          "sentence_index", "sentence_score", "sentence_ids", "phrase_spans", "region_phrase", "region_phrase_cos")
MATCH_RULES = ("word_vectors", "class_sentence", "attribute_aware")
SENTENCE_SOURCES = ("retrieved", "aligned")


# The default rule's threshold: measured on the world (docs/muvla_data.md, "Phrase matches").
DEFAULT_MATCH_THRESHOLD = 0.8


class CorpusBuildError(InputError):
    """A corpus that cannot be built, resumed or read as asked."""


@dataclasses.dataclass(frozen=True)
class CorpusSettings:
    """k: sentences per image (the paper: 5); max_tokens (L), max_phrases (P), max_tag_tokens (T):
    the fixed array shapes; index: the retrieval.backends kind that searches the corpus; regions:
    which detections become regions; match, match_threshold: the tag-phrase matching rule and the
    cosine below which a region has no phrase (see the module docstring); sentences: "retrieved"
    or "aligned"."""

    k: int = 5
    max_tokens: int = 40
    max_phrases: int = 8
    max_tag_tokens: int = 32
    images_per_shard: int = 2048
    index: str = "exact"
    regions: RegionSettings = RegionSettings()
    match: str = "word_vectors"
    match_threshold: float = DEFAULT_MATCH_THRESHOLD
    sentences: str = "retrieved"

    def __post_init__(self):
        for name in ("k", "max_tokens", "max_phrases", "max_tag_tokens", "images_per_shard"):
            if getattr(self, name) < 1:
                raise CorpusBuildError(f"{name}={getattr(self, name)}: expected an integer >= 1")
        if self.match not in MATCH_RULES:
            raise CorpusBuildError(f"match={self.match!r}: expected one of {', '.join(MATCH_RULES)}")
        if not -1.0 <= self.match_threshold <= 1.0:
            raise CorpusBuildError(f"match_threshold={self.match_threshold}: expected a cosine in [-1, 1] "
                                   "(-1 keeps every best phrase)")
        if self.match == "attribute_aware" and not self.regions.attributes:
            raise CorpusBuildError("match='attribute_aware' needs the regions' attribute words "
                                   "(RegionSettings.attributes, i.e. no --no_attributes)")
        if self.sentences not in SENTENCE_SOURCES:
            raise CorpusBuildError(f"sentences={self.sentences!r}: expected one of {', '.join(SENTENCE_SOURCES)}")


class ImageSource(Protocol):
    """Images with detections, addressed by position: `read(start, end)` -> (ids, Regions). A source
    whose images have their own captions also has `captions(start, end)` -> [image][caption] (what
    sentences="aligned" uses)."""

    count: int
    class_names: tuple[str, ...]

    def fingerprint(self) -> dict[str, Any]: ...

    def read(self, start: int, end: int) -> tuple[list[str], Regions]: ...


class WorldImages:
    """A split of the embedded world: the simulated detector's tags, features from its frozen two-tower."""

    def __init__(self, builder, split: str, encoder, settings: RegionSettings):
        from vlcore.world.taxonomy import COARSE_NAMES

        if split not in builder.info.splits:
            raise CorpusBuildError(f"{builder.name}: no split {split!r}; available {sorted(builder.info.splits)}")
        self.builder, self.split, self.encoder, self.settings = builder, split, encoder, settings
        self.count = builder.info.splits[split].num_examples
        self.class_names = tuple(COARSE_NAMES)

    def fingerprint(self) -> dict[str, Any]:
        b = self.builder
        return {"source": "world", "dataset": f"{b.name}/{b.builder_config.name}", "version": str(b.version),
                "split": self.split, "count": self.count, "encoder": self.encoder.fingerprint()}

    def read(self, start: int, end: int) -> tuple[list[str], Regions]:
        import tensorflow_datasets as tfds

        import tensorflow as tf

        read = tfds.ReadConfig(num_parallel_calls_for_decode=tf.data.AUTOTUNE)  # PNG decoding on every core
        ds = self.builder.as_dataset(split=f"{self.split}[{start}:{end}]", shuffle_files=False, read_config=read)
        ds = ds.map(lambda e: {"image": e["image"], "image_id": e["image_id"], "tags": e["tags"]},
                    num_parallel_calls=tf.data.AUTOTUNE)
        examples = list(tfds.as_numpy(ds.prefetch(64)))
        batch = {"image": np.stack([e["image"] for e in examples])}
        for key in ("bbox", "label", "confidence", "attributes"):
            batch[f"tags_{key}"] = [e["tags"][key] for e in examples]
        ids = [str(int(e["image_id"])) for e in examples]
        return ids, world_regions(batch, self.encoder, self.class_names, self.settings)

    def captions(self, start: int, end: int) -> list[list[str]]:
        """Each image's own caption (the split's `caption`: one per world image), images not decoded."""
        import tensorflow_datasets as tfds

        ds = self.builder.as_dataset(split=f"{self.split}[{start}:{end}]", shuffle_files=False,
                                     decoders={"image": tfds.decode.SkipDecoding()})
        return [[e.decode("utf-8")] for e in tfds.as_numpy(ds.map(lambda e: e["caption"]))]


class VinvlImages:
    """VinVL features.tsv + predictions.tsv (random access through predictions.lineidx)."""

    def __init__(self, features_tsv: str, predictions_tsv: str, class_names: Sequence[str],
                 settings: RegionSettings):
        from jaxmuvla.vinvl import DetectionTable

        self.paths = (str(features_tsv), str(predictions_tsv))
        self.table = DetectionTable(features_tsv, predictions_tsv, min_confidence=settings.min_confidence,
                                    min_area_ratio=settings.min_area_ratio, max_regions=None)
        self.count = len(self.table)
        self.class_names = tuple(class_names)
        self.settings = settings

    def fingerprint(self) -> dict[str, Any]:
        stats = [Path(p).stat() for p in self.paths]
        return {"source": "vinvl", "files": list(self.paths), "sizes": [s.st_size for s in stats],
                "mtimes": [s.st_mtime_ns for s in stats], "count": self.count}

    def read(self, start: int, end: int) -> tuple[list[str], Regions]:
        detections = [self.table[i] for i in range(start, end)]
        return [d.image_id for d in detections], vinvl_regions(detections, self.class_names, self.settings)


@dataclasses.dataclass
class StageTimes:
    """Seconds spent in each stage of the build (for the speed report; not part of the output)."""

    regions: float = 0.0
    queries: float = 0.0
    search: float = 0.0
    spacy: float = 0.0
    matching: float = 0.0
    writing: float = 0.0
    images: int = 0

    def per_second(self) -> dict[str, float]:
        return {stage: self.images / max(getattr(self, stage), 1e-9)
                for stage in ("regions", "queries", "search", "spacy", "matching", "writing")}


class CorpusBuilder:
    """Builds shards of the weakly aligned corpus (see the module docstring). word_vectors: the static
    table of the word-vector rules (default: GloVe, `WordVectors.glove()`)."""

    def __init__(self, images: ImageSource, bank: SentenceBank, text_encoder: SentenceEncoder, tokenizer,
                 settings: CorpusSettings, phraser: NounPhraser | None = None,
                 word_vectors: WordVectors | None = None):
        if settings.sentences == "retrieved" and settings.k > bank.count:
            raise CorpusBuildError(f"k={settings.k} sentences per image, but the corpus has only {bank.count}")
        if settings.sentences == "aligned" and not callable(getattr(images, "captions", None)):
            raise CorpusBuildError(f"sentences='aligned' needs images with their own captions; "
                                   f"{type(images).__name__} has none")
        self.images, self.bank, self.encoder, self.tokenizer = images, bank, text_encoder, tokenizer
        self.settings = settings
        self.phraser = phraser or NounPhraser()
        self.word_vectors = None
        if settings.match != "class_sentence":
            self.word_vectors = word_vectors or WordVectors.glove()
        self.times = StageTimes()
        self._parsed: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = {}  # sentence -> ids, spans, phrases

    def settings_json(self) -> dict[str, Any]:
        s = self.settings
        return {"format_version": FORMAT_VERSION, "images": self.images.fingerprint(),
                "corpus": self.bank.fingerprint, "text_encoder": self.encoder.fingerprint(),
                "tokenizer": {"name": type(self.tokenizer).__name__, "vocab_size": len(self.tokenizer)},
                "word_vectors": self.word_vectors.fingerprint() if self.word_vectors is not None else None,
                "class_names": list(self.images.class_names),
                "settings": {**dataclasses.asdict(s), "regions": dataclasses.asdict(s.regions)}}

    # -- one shard ----------------------------------------------------------------------------

    def shard_arrays(self, start: int, end: int) -> dict[str, np.ndarray]:
        s, t = self.settings, self.times
        clock = time.perf_counter()
        ids, regions = self.images.read(start, end)
        t.regions += time.perf_counter() - clock
        n, r = len(ids), s.regions.max_regions
        names = self.images.class_names

        clock = time.perf_counter()
        queries = [tag_query(regions.words[i], [names[c] for c in regions.classes[i, :regions.num[i]]],
                             regions.boxes[i, :regions.num[i], 4]) for i in range(n)]
        query_embeddings = self.encoder.encode(queries)
        t.queries += time.perf_counter() - clock

        clock = time.perf_counter()
        texts, scores, sentence_index = self._sentences(start, end, query_embeddings)
        t.search += time.perf_counter() - clock

        clock = time.perf_counter()
        self._parse(sorted({x for row in texts for x in row} - set(self._parsed)))
        t.spacy += time.perf_counter() - clock

        clock = time.perf_counter()
        out = {
            "image_id": np.asarray(ids, dtype="U64"),
            "region_features": regions.features.astype(np.float32),
            "region_boxes": regions.boxes.astype(np.float32),
            "region_class": regions.classes.astype(np.int32),
            "region_conf": regions.confidences.astype(np.float32),
            "sentence_index": sentence_index.astype(np.int64),
            "sentence_score": scores.astype(np.float32),
            "sentence_ids": np.stack([np.stack([self._parsed[x][0] for x in row]) for row in texts]),
            "phrase_spans": np.stack([np.stack([self._parsed[x][1] for x in row]) for row in texts]),
        }
        out["tag_ids"], out["tag_region"] = self._tags(regions.words)
        out["region_phrase"], out["region_phrase_cos"] = self._match(regions, texts, r)
        t.matching += time.perf_counter() - clock
        t.images += n
        return out

    def _sentences(self, start: int, end: int, queries: np.ndarray) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
        """The K sentences of each image: (texts [n][K], sentence_score [n, K], sentence_index [n, K])."""
        k = self.settings.k
        if self.settings.sentences == "retrieved":
            scores, index = self.bank.search(queries, k)
            distinct = np.unique(index)
            text_of = dict(zip(distinct.tolist(), self.bank.text(distinct)))
            return [[text_of[int(j)] for j in row] for row in index], scores, index
        captions = self.images.captions(start, end)
        if len(captions) != len(queries) or not all(captions):
            raise CorpusBuildError(f"images [{start}, {end}): sentences='aligned' needs at least one caption per "
                                   "image")
        texts = [[c[j % len(c)] for j in range(k)] for c in captions]  # fewer than K: repeated in order
        distinct = sorted({c for row in captions for c in row})
        embedded = dict(zip(distinct, self.encoder.encode(distinct)))
        scores = np.array([[float(np.dot(q, embedded[x])) for x in row] for q, row in zip(queries, texts)],
                          np.float32).reshape(len(texts), k)
        return texts, scores, np.full((len(texts), k), -1, np.int64)

    def _parse(self, texts: list[str]) -> None:
        """Noun phrases and word pieces of sentences not seen before (each sentence once per build);
        phrases cut off by truncation (or past max_phrases) are gone."""
        if not texts:
            return
        phrases = self.phraser.phrases(texts)
        kept: list[list[int]] = []
        token_ids, spans = wordpiece_spans(self.tokenizer, texts, phrases, self.settings.max_tokens,
                                           max_phrases=self.settings.max_phrases, kept=kept)
        for j, text in enumerate(texts):
            self._parsed[text] = (token_ids[j], spans[j], [phrases[j][p].text for p in kept[j]])

    def _tags(self, words: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Each region's words as word pieces, concatenated in region order (truncated to T)."""
        n, t = len(words), self.settings.max_tag_tokens
        ids = np.zeros((n, t), np.int32)
        owner = np.full((n, t), -1, np.int32)
        flat = [w for image in words for w in image]
        pieces = self.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        k = 0
        for i, image in enumerate(words):
            position = 0
            for region in range(len(image)):
                for piece in pieces[k]:
                    if position < t:
                        ids[i, position], owner[i, position] = piece, region
                        position += 1
                k += 1
        return ids, owner

    def match_tags(self, regions: Regions) -> list[list[str]]:
        """What each region is matched by: its class word, or (attribute_aware) all its words."""
        if self.settings.match == "attribute_aware":
            return [list(words) for words in regions.words]
        names = self.images.class_names
        return [[names[c] for c in regions.classes[i, :regions.num[i]]] for i in range(len(regions.num))]

    def similarity(self, tags: list[str], phrases: list[str]) -> np.ndarray:
        """[tags, phrases] float32 similarity under the matching rule (-inf: never matched)."""
        if self.settings.match == "class_sentence":
            embedded = self.encoder.encode(list(tags) + list(phrases))  # each text alone: batch-independent
            return embedded[:len(tags)] @ embedded[len(tags):].T
        return self.word_vectors.similarity(tags, phrases)

    def _match(self, regions: Regions, texts: list[list[str]], r: int) -> tuple[np.ndarray, np.ndarray]:
        """The best phrase of each image's sentences for each region (`best_phrases` under the rule;
        each distinct tag against each distinct phrase once per shard)."""
        n, k = len(texts), self.settings.k
        best = np.full((n, k, r), -1, np.int32)
        cos = np.zeros((n, k, r), np.float32)
        tags = self.match_tags(regions)
        phrases = [[self._parsed[x][2] for x in row] for row in texts]
        tag_texts = sorted({w for image in tags for w in image})
        phrase_texts = sorted({p for row in phrases for sentence in row for p in sentence})
        if not tag_texts or not phrase_texts:
            return best, cos
        tag_row = {x: i for i, x in enumerate(tag_texts)}
        phrase_col = {x: i for i, x in enumerate(phrase_texts)}
        sims = self.similarity(tag_texts, phrase_texts)
        for i in range(n):
            if not tags[i]:
                continue
            rows = sims[[tag_row[x] for x in tags[i]]]  # [regions, all phrases]
            for kk in range(k):
                if phrases[i][kk]:
                    best[i, kk, :len(rows)], cos[i, kk, :len(rows)] = best_phrases(
                        rows[:, [phrase_col[p] for p in phrases[i][kk]]], self.settings.match_threshold)
        return best, cos


# ---------------------------------------------------------------------------------------------
# the build: settings first, this process's shards, the manifest when every shard is there


def build_corpus(out_dir: str | Path, builder: CorpusBuilder, *, process_index: int = 0, process_count: int = 1,
                 progress: bool = True, after_shard: Callable[[str], None] | None = None) -> dict | None:
    """Builds this process's shards of the corpus into `out_dir` and returns the manifest once every
    shard exists (None while other processes' shards are missing).

    Shards are split between processes in contiguous ranges; a finished shard is never rewritten,
    so a rerun resumes. A directory built with other settings is refused before anything is
    written. `after_shard(name)` is called after each shard is written (a progress hook).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CorpusBuildError(f"{out}: exists and is not a directory")
    settings = json.loads(json.dumps(builder.settings_json()))
    for name in (SETTINGS_NAME, MANIFEST_NAME):
        if (out / name).is_file():
            stored = json.loads((out / name).read_text())
            diff = differing_keys({k: v for k, v in stored.items() if k in settings}, settings)
            if diff:
                raise CorpusBuildError(f"{out / name}: the corpus there was built with other settings (differs in: "
                                       f"{', '.join(diff)}); use another --out or the same settings")
    if (out / MANIFEST_NAME).is_file():
        return json.loads((out / MANIFEST_NAME).read_text())
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(f"{TMP_PREFIX}*"):  # an interrupted shard write
        import shutil

        shutil.rmtree(leftover, ignore_errors=True)
    if not (out / SETTINGS_NAME).is_file():
        atomic_write_json(out / SETTINGS_NAME, settings)

    n, per = builder.images.count, builder.settings.images_per_shard
    num_shards = -(-n // per)
    mine = range(process_index * num_shards // process_count, (process_index + 1) * num_shards // process_count)
    todo = [i for i in mine if not (out / shard_name(i)).is_dir()]
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc="weakly aligned corpus", unit="shard",
              disable=not progress) as bar:
        for i in todo:
            arrays = builder.shard_arrays(i * per, min(n, (i + 1) * per))
            clock = time.perf_counter()
            write_shard(out, shard_name(i), arrays)
            builder.times.writing += time.perf_counter() - clock
            bar.update(1)
            if after_shard is not None:
                after_shard(shard_name(i))
    if all((out / shard_name(i)).is_dir() for i in range(num_shards)):
        # absolute: the manifest's bytes must not depend on where the corpus directory is
        return write_manifest(out, {**settings, "bank_directory": str(builder.bank.directory.absolute())},
                              num_shards)
    return None


def write_manifest(out: Path, settings: dict, num_shards: int) -> dict:
    """The manifest (settings, shards with counts and sha256, totals), written atomically; any
    process that finds every shard written may write it: its bytes depend on the shards only."""
    from vlcore.array_shards import shard_sha256

    shards, totals = [], {"images": 0, "images_without_regions": 0, "retrieved": 0, "retrieved_without_phrase": 0,
                          "regions": 0, "regions_matched": 0}
    for i in range(num_shards):
        directory = out / shard_name(i)
        files = sorted(f"{k}.npy" for k in ARRAYS)
        probe = {k: np.load(directory / f"{k}.npy", mmap_mode="r") for k in ("region_class", "phrase_spans",
                                                                             "region_phrase")}
        count = len(probe["region_class"])
        shards.append({"name": shard_name(i), "count": count, "sha256": shard_sha256(directory, files)})
        has_region = np.asarray(probe["region_class"]) >= 0
        has_phrase = (np.asarray(probe["phrase_spans"])[..., 0] >= 0).any(-1)
        totals["images"] += count
        totals["images_without_regions"] += int((~has_region.any(1)).sum())
        totals["retrieved"] += int(has_phrase.size)
        totals["retrieved_without_phrase"] += int((~has_phrase).sum())
        totals["regions"] += int(has_region.sum())
        totals["regions_matched"] += int((np.asarray(probe["region_phrase"]) >= 0).any(1)[has_region].sum())
    manifest = {**settings, "shards": shards, "totals": totals}
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# reading


class WeaklyAlignedCorpus:
    """A finished corpus: `arrays` (name -> rows over all shards, memory-mapped, `x[indices]`)."""

    def __init__(self, directory: str | Path, *, verify: bool = False):
        self.directory = Path(directory)
        path = self.directory / MANIFEST_NAME
        if not path.is_file():
            raise CorpusBuildError(f"{self.directory}: not a finished corpus (no {MANIFEST_NAME}); build it with "
                                   "python -m jaxmuvla.build_corpus")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise CorpusBuildError(f"{path}: format_version {self.manifest.get('format_version')!r}, "
                                   f"expected {FORMAT_VERSION}")
        parts = [read_shard(self.directory, ShardInfo(s["name"], s["count"], s["sha256"]), ARRAYS, verify=verify)
                 for s in self.manifest["shards"]]
        self.arrays = {k: ConcatenatedRows([p[k] for p in parts]) for k in ARRAYS}
        self.count = sum(s["count"] for s in self.manifest["shards"])
        self.class_names = tuple(self.manifest["class_names"])

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    @property
    def bank_directory(self) -> Path:
        """Where the text corpus it retrieved from is kept (`jaxmuvla.sentence_bank`)."""
        return Path(self.manifest["bank_directory"])

    @property
    def manifest_sha256(self) -> str:
        """Identifies this exact corpus (settings and every shard's checksum)."""
        import hashlib

        return hashlib.sha256((self.directory / MANIFEST_NAME).read_bytes()).hexdigest()

    def check_settings(self, expected: dict[str, Any]) -> None:
        """Refuses a corpus built with other settings than a trainer's config names."""
        diff = sorted(k for k, v in expected.items() if self.settings.get(k) != v)
        if diff:
            raise CorpusBuildError(f"{self.directory}: built with other settings than the config names (differs in: "
                                   + ", ".join(f"{k} {self.settings.get(k)!r} != {expected[k]!r}" for k in diff) + ")")


def select_sentence(batch: dict, choice: np.ndarray) -> dict:
    """One of the K retrieved sentences per example: choice [b] in [0, K). Returns sentence_ids [b, L],
    phrase_spans [b, P, 2], region_phrase [b, R], region_phrase_cos [b, R], sentence_index [b].
    Works on numpy and on jax arrays (inside a jitted step, with choice drawn from the step's key)."""
    xp = np if isinstance(batch["sentence_ids"], np.ndarray) else __import__("jax.numpy").numpy
    rows = xp.arange(choice.shape[0])
    return {key: batch[key][rows, choice] for key in
            ("sentence_ids", "phrase_spans", "region_phrase", "region_phrase_cos", "sentence_index")}


def sentence_choice(seed: int, step: int, indices: np.ndarray, k: int) -> np.ndarray:
    """Which of the K sentences each example of a step uses: a pure function of (seed, example index,
    step), so a resumed run, or one on other devices, picks the same ones."""
    indices = np.asarray(indices, np.int64)
    return np.array([np.random.default_rng([seed, step, int(i)]).integers(k) for i in indices], np.int32)
