"""The unaligned text corpus of µ-VLA, streamed one sentence at a time.

A source is either

* `tfds:NAME[/CONFIG]:SPLIT[:FEATURE]`, e.g. `tfds:vl_world/quick:text_corpus:caption`: a TFDS
  split read with tf.data in file order (one shard after the other, no shuffling), decoding only
  the text feature. FEATURE defaults to `text`, else `caption`, else the dataset's single text
  feature; a nested path (`objects/colour`) reaches into dicts and sequences, and a feature that
  is a list of texts yields each of them. SPLIT may be sliced or summed the TFDS way
  (`train[:10%]+test`). `vl_world` configs (also `quick_seed3`-style ones, see
  `vlcore.world.builder.config_for`) are generated under data_dir when missing; any other
  dataset must already be prepared there (nothing is downloaded);
* one or more plain text files or globs, comma-separated (`a.txt,more/*.txt.gz`): one sentence a
  line, UTF-8, gzip-compressed when the name ends in `.gz`. Files are read in the order given,
  each glob's matches sorted; a file named twice is read once.

Every sentence is stripped; empty ones are skipped and counted (`CorpusStats`). Nothing is held
in memory beyond a line (files) or a batch of 1024 sentences (TFDS).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import os
import re
import zlib
from pathlib import Path
from typing import Any, Iterator

from vlcore.errors import InputError

TFDS_PREFIX = "tfds:"
DEFAULT_FEATURES = ("text", "caption")  # tried in this order before "the single text feature"
TFDS_BATCH = 1024  # sentences per tf.data batch: per-element iteration in Python is the slow part
FINGERPRINT_FORMAT = "jaxmuvla.text_corpus/1"  # bump when what iter_sentences yields changes

# NAME[/CONFIG]:SPLIT[:FEATURE]; a split slice (`train[:100]`) may hold colons of its own.
_TFDS_RE = re.compile(r"^(?P<name>[^:\[\]]+):(?P<split>[^:\[\]]+(?:\[[^\]]*\])?(?:\+[^:\[\]]+(?:\[[^\]]*\])?)*)"
                      r"(?::(?P<feature>[^:]+))?$")
_SEED_CONFIG_RE = re.compile(r"^(?P<base>\w+?)_seed(?P<seed>\d+)$")


class CorpusError(InputError):
    """A text corpus source that cannot be read: missing file, unknown dataset/split/feature,
    non-UTF-8 text, or no sentence at all."""


@dataclasses.dataclass
class CorpusStats:
    """Counts filled in while `iter_sentences` streams (final once the iterator is exhausted)."""

    sentences: int = 0  # sentences yielded
    empty: int = 0  # empty (after stripping) lines or texts skipped


def iter_sentences(source: str, *, data_dir: str | os.PathLike | None = None,
                   stats: CorpusStats | None = None) -> Iterator[str]:
    """Streams the stripped, non-empty sentences of `source` (see the module docstring).

    data_dir: the TFDS data directory (TFDS sources only; None: TFDS's default).
    stats: if given, its counts are updated as sentences are read.

    The source is checked now (files exist, dataset/split/feature are known: a `CorpusError`
    here); a file that turns out not to be UTF-8, or a source without any sentence, raises
    `CorpusError` while iterating.
    """
    stats = CorpusStats() if stats is None else stats
    if source.startswith(TFDS_PREFIX):
        texts = _tfds_texts(_resolve_tfds(source, data_dir))
    else:
        texts = _file_texts(_resolve_files(source))
    return _sentences(source, texts, stats)


def corpus_fingerprint(source: str, data_dir: str | os.PathLike | None = None, *, content: bool = False) -> str:
    """A hex sha256 naming the corpus `iter_sentences(source)` yields, for caching derived data.

    Cheap by default, reading no text:
    * files: over each file's absolute path, size and mtime (ns), in reading order;
    * TFDS: over the dataset's full name (name/config/version), the split, the resolved feature
      path (so the default feature and its explicit name agree) and the base splits' example
      and byte counts. data_dir is not part of it: a TFDS version names its data.
    content=True hashes the streamed sentences instead (reads the whole corpus; exact).
    """
    h = hashlib.sha256(FINGERPRINT_FORMAT.encode())
    if content:
        h.update(b"\0content")
        for sentence in iter_sentences(source, data_dir=data_dir):
            h.update(sentence.encode("utf-8") + b"\n")  # a stripped sentence holds no newline
        return h.hexdigest()
    if source.startswith(TFDS_PREFIX):
        src = _resolve_tfds(source, data_dir)
        splits = src.builder.info.splits
        ident: Any = {
            "tfds": src.builder.info.full_name,
            "split": src.split,
            "feature": "/".join(src.path),
            "base_splits": {s: [splits[s].num_examples, splits[s].num_bytes] for s in src.base_splits},
        }
    else:
        ident = {"files": []}
        for path in _resolve_files(source):
            st = path.stat()
            ident["files"].append([str(path), st.st_size, st.st_mtime_ns])
    h.update(json.dumps(ident, sort_keys=True).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- common


def _sentences(source: str, texts: Iterator[str], stats: CorpusStats) -> Iterator[str]:
    for text in texts:
        text = text.strip()
        if not text:
            stats.empty += 1
            continue
        stats.sentences += 1
        yield text
    if stats.sentences == 0:
        raise CorpusError(f"{source}: empty corpus (no sentence; {stats.empty} empty lines or texts)")


# ----------------------------------------------------------------------------- plain files


def _resolve_files(source: str) -> list[Path]:
    """The files of a comma-separated list of paths and globs, in reading order, each once."""
    entries = [e.strip() for e in source.split(",") if e.strip()]
    if not entries:
        raise CorpusError(f"{source!r}: empty text corpus source (expected files, globs or tfds:NAME:SPLIT)")
    files: dict[Path, None] = {}
    for entry in entries:
        pattern = os.path.expanduser(entry)
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise CorpusError(f"{entry}: no file matches this glob")
        else:
            if not os.path.exists(pattern):
                raise CorpusError(f"{entry}: no such file")
            if not os.path.isfile(pattern):
                raise CorpusError(f"{entry}: not a regular file (expected a text file, one sentence a line)")
            matches = [pattern]
        for m in matches:
            files.setdefault(Path(m).absolute(), None)
    return list(files)


def _file_texts(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        yield from _lines(path)


def _lines(path: Path) -> Iterator[str]:
    """The lines of one file, decoded one by one (so a bad byte is reported with its line)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CorpusError(f"{path}: line {number} is not UTF-8 ({e.reason} at byte {e.start})") from None
                if number == 1 and line.startswith("\ufeff"):  # a byte-order mark is no text
                    line = line[1:]
                yield line
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise CorpusError(f"{path}: not a readable gzip file ({e})") from None
    except OSError as e:
        raise CorpusError(f"{path}: cannot read ({e.strerror or e})") from None


# ----------------------------------------------------------------------------- TFDS


@dataclasses.dataclass
class _TfdsSource:
    builder: Any  # tfds.core.DatasetBuilder, prepared
    split: str
    base_splits: list[str]
    path: tuple[str, ...]  # the text feature's path in the FeaturesDict


def _resolve_tfds(source: str, data_dir) -> _TfdsSource:
    spec = source[len(TFDS_PREFIX):]
    m = _TFDS_RE.match(spec)
    if not m:
        raise CorpusError(f"{source}: expected tfds:NAME[/CONFIG]:SPLIT[:FEATURE]")
    name, split, feature = m["name"].strip(), m["split"].strip(), m["feature"]
    builder = _tfds_builder(source, name, data_dir)

    base_splits = [re.sub(r"\[.*\]$", "", s).strip() for s in split.split("+")]
    known = list(builder.info.splits)
    for s in base_splits:
        if s not in known:
            raise CorpusError(f"{source}: {builder.info.full_name} has no split {s!r} (splits: {', '.join(known)})")
    path = _text_feature(source, builder.info.features, feature)
    return _TfdsSource(builder=builder, split=split, base_splits=base_splits, path=path)


def _tfds_builder(source: str, name: str, data_dir):
    """The prepared builder of NAME[/CONFIG]; vl_world is generated when missing."""
    import tensorflow_datasets as tfds

    import vlcore.world.builder as world  # registers vl_world

    dataset, _, config = name.partition("/")
    data_dir = None if data_dir is None else str(data_dir)
    if dataset == "vl_world":
        seeded = _SEED_CONFIG_RE.match(config or "")
        base, seed = (seeded["base"], int(seeded["seed"])) if seeded else (config or "default", None)
        try:
            builder = world.builder(data_dir, base, seed)
        except ValueError as e:
            raise CorpusError(f"{source}: {e}") from None
        if not builder.is_prepared():
            builder = world.prepare(data_dir, base, seed)  # seconds for tiny, ~1-2 min for quick/default
        return builder
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise CorpusError(f"{source}: no TFDS dataset named {dataset!r}") from None
    except ValueError as e:  # an unknown config, mostly; TFDS's message runs over many lines
        raise CorpusError(f"{source}: cannot build TFDS dataset {name!r} ({str(e).splitlines()[0]})") from None
    if not builder.is_prepared():
        where = data_dir or "TFDS's default data_dir"
        raise CorpusError(f"{source}: {name} is not prepared under {where} (generate it first; nothing is downloaded)")
    return builder


def _is_text(feature) -> bool:
    import numpy as np
    import tensorflow_datasets as tfds

    if isinstance(feature, tfds.features.Text):
        return True
    return type(feature) is tfds.features.Tensor and np.dtype(feature.np_dtype).kind in "OSU"


def _unwrap_sequences(feature):
    import tensorflow_datasets as tfds

    while isinstance(feature, tfds.features.Sequence):
        feature = feature.feature
    return feature


def _text_paths(feature, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of every text feature under `feature`, through dicts and sequences."""
    import tensorflow_datasets as tfds

    feature = _unwrap_sequences(feature)
    if _is_text(feature):
        return [prefix]
    if isinstance(feature, tfds.features.FeaturesDict):
        return [p for key in feature.keys() for p in _text_paths(feature[key], prefix + (key,))]
    return []


def _text_feature(source: str, features, feature: str | None) -> tuple[str, ...]:
    import tensorflow_datasets as tfds

    candidates = _text_paths(features)
    listing = ", ".join("/".join(p) for p in candidates) or "none"
    if feature is None:
        for name in DEFAULT_FEATURES:
            if (name,) in candidates:
                return (name,)
        if len(candidates) == 1:
            return candidates[0]
        raise CorpusError(f"{source}: no `text` or `caption` feature and not exactly one text feature "
                          f"(text features: {listing}); name one as tfds:NAME:SPLIT:FEATURE")
    path = tuple(k for k in feature.strip().split("/") if k)
    node = features
    for key in path:
        node = _unwrap_sequences(node)
        if not isinstance(node, tfds.features.FeaturesDict) or key not in node.keys():
            raise CorpusError(f"{source}: no feature {feature!r} (text features: {listing})")
        node = node[key]
    if not _is_text(_unwrap_sequences(node)):
        raise CorpusError(f"{source}: feature {feature!r} is of type {type(node).__name__}, not text "
                          f"(text features: {listing})")
    return path


def _tfds_texts(src: _TfdsSource) -> Iterator[str]:
    import tensorflow as tf
    import tensorflow_datasets as tfds

    decode: Any = True
    for key in reversed(src.path):  # decode only the text feature (images are never decoded)
        decode = {key: decode}
    ds = src.builder.as_dataset(
        split=src.split,
        shuffle_files=False,
        decoders=tfds.decode.PartialDecoding(decode),
        # one shard at a time: the interleaving TFDS does by default would mix the shards' order
        read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False),
    )

    def flat(example):
        x = example
        for key in src.path:
            x = x[key]
        if isinstance(x, tf.RaggedTensor):  # a sequence of sequences of texts
            x = x.flat_values
        return tf.reshape(x, [-1])  # a text, or a list of texts, as a list

    # map/unbatch/batch keep the order; batching makes the Python side cheap.
    ds = ds.map(flat).unbatch().batch(TFDS_BATCH).prefetch(1)
    where = f"tfds:{src.builder.info.full_name}:{src.split}:{'/'.join(src.path)}"
    for batch in ds.as_numpy_iterator():
        for raw in batch:
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(f"{where}: a text is not UTF-8 ({e.reason})") from None
