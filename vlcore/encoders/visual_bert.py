"""Flax VisualBERT: BERT over [text tokens, region features], with transformers' heads.

Same math as transformers' PyTorch `VisualBertModel` and its heads (without
`image_text_alignment`: every region gets visual position 0, as transformers does then).
Parameter names mirror the HF state dicts (`visual_bert.embeddings.visual_projection.weight`
<-> `visual_bert/embeddings/visual_projection/kernel`), so `vlcore.hf_checkpoint` imports and
exports them by renaming. The encoder, pooler and MLM head are the BERT modules of
`vlcore.encoders.bert` (same layout, same names).

Two optional inputs that transformers does not have, for µ-VLA: `text_extra_embeddings`
[batch, Lt, hidden] and `visual_extra_embeddings` [batch, Lv, hidden] are added to the text and
region embeddings before the embedding LayerNorm (e.g. a box embedding of each region). Left at
None, the model is transformers' model.

Outputs are dicts: `last_hidden_state` [batch, Lt + Lv, hidden] (text first, then regions) and
`pooler_output` [batch, hidden], plus each head's logits under transformers' output names.

Dropout is transformers' too: after the embedding LayerNorm (text and regions alike), in the BERT
layers (see `vlcore.encoders.bert`) and before the VQA / visual-reasoning classifiers, active only
with deterministic=False and rngs={"dropout": key}.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from vlcore.encoders.bert import BertEncoder, BertMLMHead, BertPooler
from vlcore.encoders.configs import VisualBertConfig
from vlcore.encoders.layers import dense, layer_norm

Array = jax.Array


def _shape_error(name: str, want: str, got) -> ValueError:
    return ValueError(f"{name}: expected shape {want}, got {tuple(got.shape)}")


def check_inputs(
    config: VisualBertConfig,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    visual_embeds: Array | None = None,
    visual_attention_mask: Array | None = None,
    visual_token_type_ids: Array | None = None,
    text_extra_embeddings: Array | None = None,
    visual_extra_embeddings: Array | None = None,
) -> None:
    """Raises a ValueError naming the input and both shapes for anything the model cannot take."""
    if input_ids.ndim != 2:
        raise _shape_error("input_ids", "[batch, seq]", input_ids)
    batch, seq = input_ids.shape
    if seq > config.max_position_embeddings:
        raise ValueError(f"input_ids: sequence length {seq} exceeds max_position_embeddings "
                         f"{config.max_position_embeddings}")
    for name, x in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if x is not None and tuple(x.shape) != (batch, seq):
            raise _shape_error(name, f"[batch, seq] = {(batch, seq)} like input_ids", x)
    if text_extra_embeddings is not None and tuple(text_extra_embeddings.shape) != (batch, seq, config.hidden_size):
        raise _shape_error("text_extra_embeddings", f"[batch, seq, hidden] = {(batch, seq, config.hidden_size)}",
                           text_extra_embeddings)
    if visual_embeds is None:
        for name, x in (("visual_attention_mask", visual_attention_mask),
                        ("visual_token_type_ids", visual_token_type_ids),
                        ("visual_extra_embeddings", visual_extra_embeddings)):
            if x is not None:
                raise ValueError(f"{name} given without visual_embeds")
        return
    if visual_embeds.ndim != 3:
        raise _shape_error("visual_embeds", "[batch, regions, visual_embedding_dim]", visual_embeds)
    if visual_embeds.shape[-1] != config.visual_embedding_dim:
        raise ValueError(f"visual_embeds: last dimension {visual_embeds.shape[-1]} != visual_embedding_dim "
                         f"{config.visual_embedding_dim}")
    if visual_embeds.shape[0] != batch:
        raise ValueError(f"visual_embeds: batch {visual_embeds.shape[0]} != input_ids batch {batch}")
    regions = visual_embeds.shape[1]
    for name, x in (("visual_attention_mask", visual_attention_mask),
                    ("visual_token_type_ids", visual_token_type_ids)):
        if x is not None and tuple(x.shape) != (batch, regions):
            raise _shape_error(name, f"[batch, regions] = {(batch, regions)} like visual_embeds", x)
    if visual_extra_embeddings is not None and tuple(visual_extra_embeddings.shape) != (
            batch, regions, config.hidden_size):
        raise _shape_error("visual_extra_embeddings",
                           f"[batch, regions, hidden] = {(batch, regions, config.hidden_size)}", visual_extra_embeddings)


class VisualBertEmbeddings(nn.Module):
    """Text: word + token type + position. Regions: visual_projection(features) + visual position
    (0 for every region) + visual token type. Concatenated [text, regions], then one LayerNorm."""

    config: VisualBertConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.config
        embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=self.dtype, name=name)  # noqa: E731
        self.word_embeddings = embed(cfg.vocab_size, "word_embeddings")
        self.position_embeddings = embed(cfg.max_position_embeddings, "position_embeddings")
        self.token_type_embeddings = embed(cfg.type_vocab_size, "token_type_embeddings")
        self.visual_token_type_embeddings = embed(cfg.type_vocab_size, "visual_token_type_embeddings")
        self.visual_position_embeddings = embed(cfg.max_position_embeddings, "visual_position_embeddings")
        self.visual_projection = dense(cfg.hidden_size, "visual_projection", self.dtype)
        self.LayerNorm = layer_norm(cfg.layer_norm_eps, "LayerNorm", self.dtype)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids=None, visual_embeds=None, visual_token_type_ids=None,
                 text_extra_embeddings=None, visual_extra_embeddings=None, deterministic: bool = True) -> Array:
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        positions = jnp.arange(input_ids.shape[1])[None]
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions)
        if text_extra_embeddings is not None:
            x = x + text_extra_embeddings.astype(x.dtype)
        if visual_embeds is not None:
            if visual_token_type_ids is None:  # transformers' default: type 1 for every region
                visual_token_type_ids = jnp.ones(visual_embeds.shape[:2], jnp.int32)
            v = self.visual_projection(visual_embeds)
            v = v + self.visual_position_embeddings(jnp.zeros(visual_embeds.shape[:2], jnp.int32))
            v = v + self.visual_token_type_embeddings(visual_token_type_ids)
            if visual_extra_embeddings is not None:
                v = v + visual_extra_embeddings.astype(v.dtype)
            x = jnp.concatenate([x, v.astype(x.dtype)], axis=1)
        return self.dropout(self.LayerNorm(x), deterministic=deterministic)


def combined_mask(input_ids, attention_mask, visual_embeds, visual_attention_mask) -> Array | None:
    """Boolean [batch, 1, 1, Lt + Lv] key mask (True = may be attended), or None when nothing is masked."""
    if attention_mask is None and visual_attention_mask is None:
        return None
    batch, seq = input_ids.shape
    text = jnp.ones((batch, seq), jnp.bool_) if attention_mask is None else attention_mask.astype(jnp.bool_)
    if visual_embeds is not None:
        regions = visual_embeds.shape[1]
        visual = (jnp.ones((batch, regions), jnp.bool_) if visual_attention_mask is None
                  else visual_attention_mask.astype(jnp.bool_))
        text = jnp.concatenate([text, visual], axis=1)
    return text[:, None, None, :]


class VisualBertModel(nn.Module):
    """transformers' VisualBertModel: embeddings, the BERT encoder, and the pooler (tanh dense of token 0)."""

    config: VisualBertConfig
    add_pooling_layer: bool = True
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embeddings = VisualBertEmbeddings(self.config, self.dtype)
        self.encoder = BertEncoder(self.config.bert, self.dtype)
        if self.add_pooling_layer:
            self.pooler = BertPooler(self.config.hidden_size, self.dtype)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        visual_embeds: Array | None = None,
        visual_attention_mask: Array | None = None,
        visual_token_type_ids: Array | None = None,
        text_extra_embeddings: Array | None = None,
        visual_extra_embeddings: Array | None = None,
        deterministic: bool = True,
    ) -> dict[str, Array]:
        """input_ids [b, Lt], visual_embeds [b, Lv, visual_embedding_dim] (optional) ->
        last_hidden_state [b, Lt + Lv, hidden] (+ pooler_output [b, hidden]).

        Masks are 1/0 per token (None: attend everywhere); token types default to 0 for the
        text and 1 for the regions, as in transformers. deterministic=False applies dropout
        (needs rngs={"dropout": key}).
        """
        check_inputs(self.config, input_ids, attention_mask, token_type_ids, visual_embeds, visual_attention_mask,
                     visual_token_type_ids, text_extra_embeddings, visual_extra_embeddings)
        x = self.embeddings(input_ids, token_type_ids, visual_embeds, visual_token_type_ids,
                            text_extra_embeddings, visual_extra_embeddings, deterministic)
        x = self.encoder(x, combined_mask(input_ids, attention_mask, visual_embeds, visual_attention_mask),
                         deterministic)
        out = {"last_hidden_state": x}
        if self.add_pooling_layer:
            out["pooler_output"] = self.pooler(x)
        return out


class VisualBertPreTrainingHeads(nn.Module):
    """HF's `cls`: `predictions` (BERT's MLM head, tied to the word embeddings) over every token
    and `seq_relationship` (2-way sentence-image match) over the pooled output."""

    config: VisualBertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, pooled: Array, word_embeddings: nn.Embed) -> tuple[Array, Array]:
        prediction = BertMLMHead(self.config.bert, self.dtype, name="predictions")(hidden, word_embeddings)
        return prediction, dense(2, "seq_relationship", self.dtype)(pooled)


class VisualBertForPreTraining(nn.Module):
    """Outputs: the VisualBertModel ones, prediction_logits [b, Lt + Lv, vocab_size] and
    seq_relationship_logits [b, 2]."""

    config: VisualBertConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.visual_bert = VisualBertModel(self.config, True, self.dtype)
        self.cls = VisualBertPreTrainingHeads(self.config, self.dtype)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, visual_embeds=None,
                 visual_attention_mask=None, visual_token_type_ids=None, text_extra_embeddings=None,
                 visual_extra_embeddings=None, deterministic: bool = True) -> dict[str, Array]:
        out = self.visual_bert(input_ids, attention_mask, token_type_ids, visual_embeds, visual_attention_mask,
                               visual_token_type_ids, text_extra_embeddings, visual_extra_embeddings, deterministic)
        out["prediction_logits"], out["seq_relationship_logits"] = self.cls(
            out["last_hidden_state"], out["pooler_output"], self.visual_bert.embeddings.word_embeddings)
        return out


class VisualBertForQuestionAnswering(nn.Module):
    """HF's VQA head: `cls` (dense hidden -> num_labels) on the hidden state of the text token at
    index sum(attention_mask) - 2 (the last token before [SEP] for right-padded text, as in the
    original code), not on the pooler. Outputs: the VisualBertModel ones and logits [b, num_labels].

    transformers requires attention_mask here; None means every text token is real (index Lt - 2).
    An index below 0 (fewer than 2 real tokens) is clipped to 0, where transformers would fail.
    """

    config: VisualBertConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.visual_bert = VisualBertModel(self.config, True, self.dtype)
        self.cls = dense(self.config.num_labels, "cls", self.dtype)
        self.dropout = nn.Dropout(self.config.hidden_dropout_prob)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, visual_embeds=None,
                 visual_attention_mask=None, visual_token_type_ids=None, text_extra_embeddings=None,
                 visual_extra_embeddings=None, deterministic: bool = True) -> dict[str, Array]:
        out = self.visual_bert(input_ids, attention_mask, token_type_ids, visual_embeds, visual_attention_mask,
                               visual_token_type_ids, text_extra_embeddings, visual_extra_embeddings, deterministic)
        hidden = out["last_hidden_state"]
        if attention_mask is None:
            index = jnp.full((hidden.shape[0],), input_ids.shape[1] - 2, jnp.int32)
        else:
            index = attention_mask.astype(jnp.int32).sum(axis=1) - 2
        index = jnp.clip(index, 0, hidden.shape[1] - 1)
        gathered = jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
        out["logits"] = self.cls(self.dropout(gathered, deterministic=deterministic))
        return out


class VisualBertForVisualReasoning(nn.Module):
    """HF's NLVR2 head: `cls` (dense hidden -> num_labels) on the pooler output.
    Outputs: the VisualBertModel ones and logits [b, num_labels]."""

    config: VisualBertConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.visual_bert = VisualBertModel(self.config, True, self.dtype)
        self.cls = dense(self.config.num_labels, "cls", self.dtype)
        self.dropout = nn.Dropout(self.config.hidden_dropout_prob)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, visual_embeds=None,
                 visual_attention_mask=None, visual_token_type_ids=None, text_extra_embeddings=None,
                 visual_extra_embeddings=None, deterministic: bool = True) -> dict[str, Array]:
        out = self.visual_bert(input_ids, attention_mask, token_type_ids, visual_embeds, visual_attention_mask,
                               visual_token_type_ids, text_extra_embeddings, visual_extra_embeddings, deterministic)
        out["logits"] = self.cls(self.dropout(out["pooler_output"], deterministic=deterministic))
        return out


class VisualBertRegionToPhraseAttention(nn.Module):
    """HF's `attention` of the region-to-phrase model: ONE head of width hidden / num_attention_heads;
    scores = query(phrases) . key(regions) / sqrt(width) + (1 - region mask) * finfo.min, no softmax.
    `value` exists in the checkpoints but the forward never uses it (it is created at init only)."""

    config: VisualBertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query: Array, key: Array, mask: Array) -> Array:
        width = self.config.hidden_size // self.config.num_attention_heads
        q = dense(width, "query", self.dtype)(query)
        k = dense(width, "key", self.dtype)(key)
        if self.is_initializing():
            dense(width, "value", self.dtype)(key)
        scores = jnp.einsum("bpd,brd->bpr", q, k) / jnp.asarray(math.sqrt(width), q.dtype)
        penalty = (1 - mask.astype(scores.dtype)) * jnp.finfo(scores.dtype).min
        return scores + penalty[:, None, :]


class VisualBertForRegionToPhraseAlignment(nn.Module):
    """HF's Flickr30k-entities model: gathers the hidden states at `region_to_phrase_position`
    [b, P] (-1 -> 0) and scores them against every region's hidden state.
    Outputs: the VisualBertModel ones and logits [b, P, Lv].

    Its `cls` (pre-training heads) is in the checkpoints but unused by the forward, as in
    transformers; the parameters are created at init so that export writes them back.
    """

    config: VisualBertConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.visual_bert = VisualBertModel(self.config, True, self.dtype)
        self.cls = VisualBertPreTrainingHeads(self.config, self.dtype)
        self.attention = VisualBertRegionToPhraseAttention(self.config, self.dtype)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, visual_embeds=None,
                 visual_attention_mask=None, visual_token_type_ids=None, text_extra_embeddings=None,
                 visual_extra_embeddings=None, region_to_phrase_position=None,
                 deterministic: bool = True) -> dict[str, Array]:
        if visual_embeds is None:
            raise ValueError("visual_embeds is required for region-to-phrase alignment")
        if region_to_phrase_position is None:
            raise ValueError("region_to_phrase_position [batch, phrases] is required for region-to-phrase alignment")
        if region_to_phrase_position.ndim != 2 or region_to_phrase_position.shape[0] != input_ids.shape[0]:
            raise _shape_error("region_to_phrase_position", f"[batch={input_ids.shape[0]}, phrases]",
                               region_to_phrase_position)
        out = self.visual_bert(input_ids, attention_mask, token_type_ids, visual_embeds, visual_attention_mask,
                               visual_token_type_ids, text_extra_embeddings, visual_extra_embeddings, deterministic)
        hidden = out["last_hidden_state"]  # transformers applies no dropout after the encoder here
        if self.is_initializing():
            self.cls(hidden, out["pooler_output"], self.visual_bert.embeddings.word_embeddings)
        position = jnp.where(region_to_phrase_position == -1, 0, region_to_phrase_position).astype(jnp.int32)
        phrases = jnp.take_along_axis(hidden, position[:, :, None], axis=1)
        regions = hidden[:, input_ids.shape[1]:]
        if visual_attention_mask is None:
            visual_attention_mask = jnp.ones(regions.shape[:2], jnp.int32)
        out["logits"] = self.attention(phrases, regions, visual_attention_mask)
        return out


VISUAL_BERT_CLASSES = {
    "VisualBertModel": VisualBertModel,
    "VisualBertForPreTraining": VisualBertForPreTraining,
    "VisualBertForQuestionAnswering": VisualBertForQuestionAnswering,
    "VisualBertForVisualReasoning": VisualBertForVisualReasoning,
    "VisualBertForRegionToPhraseAlignment": VisualBertForRegionToPhraseAlignment,
}
