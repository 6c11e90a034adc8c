"""A BERT vocabulary restricted to the word pieces a closed-vocabulary world uses.

The MLM head of a BERT is tied to its word-embedding table: every predicted position costs
hidden x vocabulary multiply-adds, forward and backward. With BERT's 30,522 word pieces that is
most of a small model's step, while the embedded world's text uses a few hundred of them. A
`Vocabulary` keeps the word pieces that occur in the corpus (and in any other text given, e.g.
the downstream tasks'), with the special tokens first; token ids of the full tokenizer map to it
(`map`, unknown pieces to [UNK]), and a checkpoint's word embeddings and MLM bias are cut to it
(`restrict_params`). The model stays a BERT/VisualBERT whose `vocab.txt` is the kept list.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """keep [n] int64: the full tokenizer's ids kept, in the new order; lookup [full] int32: full id
    -> new id ([UNK]'s new id for the pieces not kept); tokens: the kept pieces (the new vocab.txt)."""

    keep: np.ndarray
    lookup: np.ndarray
    tokens: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.keep)

    def map(self, ids: np.ndarray) -> np.ndarray:
        """Full-tokenizer ids (any shape) -> ids of this vocabulary."""
        return self.lookup[np.asarray(ids)]

    def special_id(self, tokenizer, token: str) -> int:
        return int(self.lookup[tokenizer.convert_tokens_to_ids(token)])

    @classmethod
    def from_ids(cls, tokenizer, used: Iterable[np.ndarray]) -> "Vocabulary":
        """The special tokens, then every id in `used` (arrays of full-tokenizer ids), in id order."""
        specials = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens]
        seen = set(int(i) for i in specials)
        for ids in used:
            seen.update(int(i) for i in np.unique(np.asarray(ids)))
        keep = np.array(sorted(seen, key=lambda i: (i not in specials, specials.index(i) if i in specials else i)),
                        np.int64)
        lookup = np.full(len(tokenizer), int(np.flatnonzero(keep == tokenizer.unk_token_id)[0]), np.int32)
        lookup[keep] = np.arange(len(keep), dtype=np.int32)
        return cls(keep, lookup, tuple(tokenizer.convert_ids_to_tokens(keep.tolist())))

    def extended(self, tokenizer, used: Iterable[np.ndarray]) -> "Vocabulary":
        """This vocabulary with the word pieces of `used` it lacks appended (in id order): every
        kept piece keeps its id, so a model trained on this vocabulary reads the new one (the
        downstream tasks' questions use words the pre-training corpus never had)."""
        have = set(int(i) for i in self.keep)
        new = sorted({int(i) for ids in used for i in np.unique(np.asarray(ids))} - have)
        if not new:
            return self
        keep = np.concatenate([self.keep, np.asarray(new, np.int64)])
        lookup = self.lookup.copy()
        lookup[keep[self.size:]] = np.arange(self.size, len(keep), dtype=np.int32)
        return Vocabulary(keep, lookup, self.tokens + tuple(tokenizer.convert_ids_to_tokens(new)))

    def describe(self) -> dict[str, Any]:
        return {"size": self.size, "tokens_sha": __import__("hashlib").sha256(
            "\n".join(self.tokens).encode()).hexdigest()[:16]}


def text_ids(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Every full-tokenizer id the texts use (for `Vocabulary.from_ids`)."""
    if not texts:
        return np.zeros(0, np.int64)
    return np.concatenate([np.asarray(ids, np.int64) for ids in tokenizer(list(texts))["input_ids"]])


WORD_EMBEDDINGS = ("embeddings", "word_embeddings", "embedding")
MLM_BIAS = ("cls", "predictions", "bias")


def restrict_params(params: Any, vocabulary: Vocabulary) -> Any:
    """A VisualBERT/µ-VLA parameter tree with the word-embedding rows and the MLM bias of the kept
    word pieces only (the tied decoder follows the embeddings)."""
    flat = flatten_dict(params)
    out = {}
    for path, value in flat.items():
        if path[-3:] == WORD_EMBEDDINGS or path[-3:] == MLM_BIAS:
            value = np.asarray(value)[vocabulary.keep]
        out[path] = value
    return unflatten_dict(out)


def extend_word_embeddings(params: Any, old: Vocabulary | None, new: Vocabulary | None, full_table: np.ndarray) -> Any:
    """params with the word-embedding rows of `new`'s appended pieces taken from `full_table` (the
    text checkpoint's whole [vocab, H] table: a piece the pre-training never saw starts where its
    BERT left it, as in a model trained on the full vocabulary)."""
    if new is None or old is None or new.size == old.size:
        return params
    flat = flatten_dict(params)
    out = {}
    for path, value in flat.items():
        if path[-3:] == WORD_EMBEDDINGS:
            value = np.concatenate([np.asarray(value), np.asarray(full_table, np.float32)[new.keep[old.size:]]])
        out[path] = value
    return unflatten_dict(out)
