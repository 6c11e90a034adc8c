"""The downstream models: µ-VLA's encoder (`visual_bert` + `box_embedding`, as pre-trained) and one
task head, as µ-VLA's public code (after UNITER) puts them on its VisualBERT:

  vqa      pooled -> MLP -> one logit per answer of the vocabulary (BCE on the soft scores)
  nlvr2    the sentence with each image separately; both pooled outputs concatenated -> MLP -> 2
  ve       pooled -> MLP -> 3 (entailment, neutral, contradiction)
  refcoco  every region token's hidden state -> MLP -> one score; softmax over the image's regions

MLP = Dense(width) -> GELU -> LayerNorm -> Dense(outputs) (width 2H for the pooled heads, H for
the region scorer). The encoder's submodules keep `MuVLA`'s names, so a pre-training checkpoint's
`visual_bert` and `box_embedding` load by name; `cls` and the region heads are left behind.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxmuvla.model import BoxEmbedding, encode
from vlcore.encoders.configs import VisualBertConfig
from vlcore.encoders.visual_bert import VisualBertModel

OUTPUTS = {"nlvr2": 2, "ve": 3, "refcoco": 1}  # vqa: the answer vocabulary's size


class ClassifierMLP(nn.Module):
    width: int
    outputs: int
    eps: float = 1e-12

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.gelu(nn.Dense(self.width, name="dense")(x), approximate=False)
        return nn.Dense(self.outputs, name="out")(nn.LayerNorm(epsilon=self.eps, name="LayerNorm")(x))


class DownstreamModel(nn.Module):
    """The encoder and the head of `task`. Inputs: input_ids / attention_mask [b, L] and regions
    features [b, R, D], boxes [b, R, 5], region_mask [b, R]; NLVR2's carry a pair axis after the
    batch ([b, 2, ...]). Output: logits [b, outputs] (refcoco: [b, R], padding regions at -1e9)."""

    config: VisualBertConfig
    task: str
    outputs: int
    box_embeddings: bool = True
    pooling: str = "cls"

    def setup(self):
        cfg = self.config
        self.visual_bert = VisualBertModel(cfg, True)
        if self.box_embeddings:
            self.box_embedding = BoxEmbedding(cfg.hidden_size, cfg.layer_norm_eps)
        width = cfg.hidden_size if self.task == "refcoco" else 2 * cfg.hidden_size
        self.head = ClassifierMLP(width, self.outputs, cfg.layer_norm_eps)

    def encode(self, input_ids, attention_mask, features, boxes, region_mask, deterministic: bool = True):
        return encode(self.visual_bert, self.box_embedding if self.box_embeddings else None, self.pooling,
                      input_ids, attention_mask, None, None, features, boxes, region_mask, deterministic)

    def __call__(self, input_ids, attention_mask, features, boxes, region_mask,
                 deterministic: bool = True) -> jax.Array:
        """deterministic=False: the encoder's dropout on (training; rngs={"dropout": key}); the head has none."""
        if self.task == "nlvr2":  # [b, 2, ...] -> [2b, ...]: each image with the sentence, one pass
            b = input_ids.shape[0]
            flat = [x.reshape(2 * b, *x.shape[2:]) for x in (input_ids, attention_mask, features, boxes, region_mask)]
            _, pooled = self.encode(*flat, deterministic=deterministic)
            return self.head(pooled.reshape(b, 2 * pooled.shape[-1]))
        hidden, pooled = self.encode(input_ids, attention_mask, features, boxes, region_mask, deterministic)
        if self.task == "refcoco":
            scores = self.head(hidden[:, input_ids.shape[1]:])[..., 0]
            return jnp.where(region_mask, scores, -1e9)
        return self.head(pooled)
