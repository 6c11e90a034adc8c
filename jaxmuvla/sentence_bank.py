"""The text corpus of µ-VLA embedded once: its sentences, their embeddings and a kNN index over them.

    cache_dir/<text encoder fingerprint>/<corpus fingerprint>/
        sentences.txt    every sentence, one a line (newlines inside a sentence become spaces)
        offsets.npy      int64 [S + 1]: byte offset of each line (random access to sentence i)
        store/           a `retrieval.memory_store` memory of the sentence embeddings (modality "text",
                         id = the sentence's position), resumable
        index-<kind>/    a saved `retrieval.backends` index over them, tied to the store

Everything is keyed by what determines it (the encoder's weights, the corpus), so a rerun or
another pre-training run reuses it, and a changed corpus or encoder gets its own directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxmuvla.text_corpus import corpus_fingerprint, iter_sentences
from retrieval.backends import Index, RetrievalError, load_index, make_index
from retrieval.memory_store import MANIFEST_NAME, MemoryStore, MemoryWriter
from vlcore.atomic_files import atomic_output
from vlcore.errors import InputError
from vlcore.sentence_encoder import SentenceEncoder

EMBED_CHUNK = 8192  # sentences embedded and written at a time (a memory shard)


class SentenceBank:
    """S sentences with random access by position, their unit-norm embeddings and an index."""

    def __init__(self, directory: Path, index_kind: str):
        self.directory = Path(directory)
        self.store = MemoryStore.open(self.directory / "store")
        self.offsets = np.load(self.directory / "offsets.npy")
        self.count = len(self.offsets) - 1
        self.index = _index(self.store, self.directory / f"index-{index_kind}", index_kind)

    @classmethod
    def build(cls, source: str, encoder: SentenceEncoder, cache_dir: str | os.PathLike, *,
              data_dir: str | None = None, index_kind: str = "exact", progress: bool = True) -> "SentenceBank":
        """Embeds the corpus `source` (see `jaxmuvla.text_corpus`) once, or opens what was built."""
        directory = Path(cache_dir) / encoder.fingerprint().replace(":", "-") / corpus_fingerprint(source, data_dir)
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / "offsets.npy").is_file():
            _write_sentences(directory, iter_sentences(source, data_dir=data_dir))
        if not (directory / "store" / MANIFEST_NAME).is_file():
            _embed(directory, encoder, progress)
        return cls(directory, index_kind)

    @property
    def fingerprint(self) -> str:
        return self.store.fingerprint()

    def text(self, ids: np.ndarray) -> list[str]:
        """The sentences at positions `ids` (any shape, flattened)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.count):
            raise InputError(f"sentence ids outside [0, {self.count})")
        out = []
        with open(self.directory / "sentences.txt", "rb") as f:
            for i in ids:
                f.seek(int(self.offsets[i]))
                out.append(f.read(int(self.offsets[i + 1] - self.offsets[i])).decode("utf-8").rstrip("\n"))
        return out

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [q, k] float32 descending, sentence ids [q, k] int64) of unit-norm queries [q, d]."""
        if k > self.count:
            raise InputError(f"k={k} is more than the corpus's {self.count} sentences")
        return self.index.search(np.asarray(queries, np.float32), k)


def _write_sentences(directory: Path, sentences) -> None:
    """sentences.txt and offsets.npy, each written whole or not at all."""
    offsets = [0]
    with atomic_output(directory / "sentences.txt") as f:
        for sentence in sentences:
            line = (" ".join(sentence.split()) + "\n").encode("utf-8")
            f.write(line)
            offsets.append(offsets[-1] + len(line))
    with atomic_output(directory / "offsets.npy") as f:
        np.save(f, np.asarray(offsets, np.int64))


def _embed(directory: Path, encoder: SentenceEncoder, progress: bool) -> None:
    from tqdm.auto import tqdm

    offsets = np.load(directory / "offsets.npy")
    count = len(offsets) - 1
    with MemoryWriter(directory / "store", encoder_fingerprint=encoder.fingerprint(), dim=encoder.dim,
                      modalities=("text",), shard_size=EMBED_CHUNK) as writer, \
            open(directory / "sentences.txt", "rb") as f:
        start = writer.num_written  # resumes after the last complete shard
        f.seek(int(offsets[start]))
        with tqdm(total=count, initial=start, desc="embedding the text corpus", unit="sentence",
                  disable=not progress) as bar:
            for begin in range(start, count, EMBED_CHUNK):
                end = min(count, begin + EMBED_CHUNK)
                chunk = [f.readline().decode("utf-8").rstrip("\n") for _ in range(end - begin)]
                writer.add(np.arange(begin, end), {"text": encoder.encode(chunk)})
                bar.update(end - begin)


def _index(store: MemoryStore, directory: Path, kind: str) -> Index:
    try:
        return load_index(str(directory), store.fingerprint())
    except (RetrievalError, OSError, ValueError):
        index = make_index(kind).build(np.asarray(store.embeddings("text"), np.float32), store.ids())
        index.save(str(directory), store.fingerprint())
        return index
