"""The trainable part of RECO: φ_image, φ_text and the temperature (the encoders stay frozen).

`kind` picks the fusion: "transformer" (RECO's one-layer fusion); "mlp" (the paper's control:
an MLP of the same size on the query alone, no retrieval, trained on the same data with the same
loss).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxreco.fusion import Fusion, FusionConfig, QueryMLP
from jaxreco.losses import reco_loss
from vlcore.contrastive import LogitScale
from vlcore.fixed_batches import map_fixed_batches

FUSION_MODULES = {"transformer": Fusion, "mlp": QueryMLP}
FUSION_KINDS = tuple(FUSION_MODULES)


class Reco(nn.Module):
    fusion: FusionConfig
    kind: str = "transformer"

    def setup(self):
        if self.kind not in FUSION_KINDS:
            raise ValueError(f"fusion kind {self.kind!r}: expected one of {FUSION_KINDS}")
        cls = FUSION_MODULES[self.kind]
        self.image_fusion = cls(self.fusion)
        self.text_fusion = cls(self.fusion)
        self.temperature = LogitScale()

    def __call__(self, image, image_neighbours, text, text_neighbours):
        """Refined (image, text) [b, dim] and the logit scale."""
        return self.image_fusion(image, image_neighbours), self.text_fusion(text, text_neighbours), self.temperature()

    def refine_image(self, image, neighbours):
        return self.image_fusion(image, neighbours)

    def refine_text(self, text, neighbours):
        return self.text_fusion(text, neighbours)


def reco_batch_loss(module: Reco, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
    """Loss of {"image", "text": [b, d]; "image_neighbours", "text_neighbours": [b, k, d]}."""
    refined_image, refined_text, scale = module.apply(
        {"params": params}, batch["image"], batch["image_neighbours"], batch["text"], batch["text_neighbours"])
    loss, metrics = reco_loss(refined_image, refined_text, batch["image"], batch["text"], scale)
    return loss, {**metrics, "logit_scale": scale}


def init_params(module: Reco, rng: jax.Array, dim: int, k: int) -> Any:
    q = jnp.zeros((1, dim), jnp.float32).at[:, 0].set(1.0)
    n = jnp.zeros((1, k, dim), jnp.float32).at[:, :, 0].set(1.0)
    return module.init(rng, q, n, q, n)["params"]


def make_refine_fn(module: Reco, params: Any, side: str, batch_size: int = 1024):
    """Host function (queries [n, d], neighbours [n, k, d]) -> refined [n, d], jitted in fixed blocks."""
    method = Reco.refine_image if side == "image" else Reco.refine_text
    fn = jax.jit(lambda p, q, nb: module.apply({"params": p}, q, nb, method=method))
    params = jax.device_get(params)

    def refine(queries: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
        return map_fixed_batches(lambda q, nb: fn(params, q, nb), [queries, neighbours], batch_size)

    return refine
