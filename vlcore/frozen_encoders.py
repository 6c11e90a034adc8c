"""Frozen two-tower encoders behind one interface: the world's trained model, or an HF CLIP.

Both the retrieval layer (encoding a memory) and RECO (embedding queries, class prompts and
test images) see a frozen encoder only through `FrozenEncoder`:

  * `preprocess(image)`: a tf.data map function, one uint8 image [H, W, 3] of any size -> the
    fixed-size array `encode_images` takes (done on the host, inside the input pipeline);
  * `encode_images(batch) -> [b, dim]` and `encode_texts(list[str]) -> [b, dim]`, float32,
    unit norm; images are encoded with a jitted function data-parallel over all local devices;
  * `fingerprint()`: a string that changes whenever the embeddings would (architecture and
    weights), stored in every memory manifest so a memory is never mixed with another model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vlcore.encoders.layers import l2_normalize
from vlcore.errors import InputError
from vlcore.fixed_batches import map_fixed_batches

# CLIP's image normalisation (openai/CLIP, transformers' CLIPImageProcessor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EncoderError(InputError):
    """A frozen encoder that cannot be loaded, or inputs it cannot encode."""


class FrozenEncoder(Protocol):
    dim: int
    image_size: int

    def fingerprint(self) -> str: ...

    def preprocess(self, image: Any) -> Any: ...

    def encode_images(self, images: np.ndarray) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def params_digest(params: Any) -> str:
    """sha256 over every parameter's path, dtype, shape and bytes."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class DataParallelImages:
    """Runs `fn(params, images, *row_aligned)` jitted over all local devices, batch padded to a fixed size.

    One compiled shape for every call: batches are cut or padded to `batch_size` (rounded up to
    a multiple of the device count, `map_fixed_batches`), and the rows are split over a 1-D device mesh.
    """

    def __init__(self, fn: Callable[..., jax.Array], params: Any, batch_size: int):
        devices = jax.local_devices()
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        mesh = jax.sharding.Mesh(np.array(devices), ("data",))
        self._rows = NamedSharding(mesh, P("data"))
        self._params = jax.device_put(params, NamedSharding(mesh, P()))
        self._fn = jax.jit(fn, out_shardings=self._rows)

    def __call__(self, images: np.ndarray, *row_aligned: np.ndarray) -> np.ndarray:
        if not len(images):
            raise EncoderError("encode_images: no images given")
        return map_fixed_batches(lambda *x: self._fn(self._params, *(jax.device_put(a, self._rows) for a in x)),
                                 [images, *row_aligned], self.batch_size).astype(np.float32)


def _check_images(images: np.ndarray, size: int, dtype: Any) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise EncoderError(f"encode_images: expected [batch, {size}, {size}, 3] (after preprocess), "
                           f"got {images.shape}")
    return images.astype(dtype, copy=False)


def resize_and_center_crop(image: Any, size: int) -> Any:
    """tf: resize the shorter side to `size` (bicubic, as CLIP) and cut the central square."""
    import tensorflow as tf

    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = size / tf.minimum(h, w)
    new_h = tf.maximum(size, tf.cast(tf.round(h * scale), tf.int32))
    new_w = tf.maximum(size, tf.cast(tf.round(w * scale), tf.int32))
    resized = tf.image.resize(tf.cast(image, tf.float32), (new_h, new_w), method="bicubic")
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return tf.clip_by_value(resized[top:top + size, left:left + size, :], 0.0, 255.0)


@dataclasses.dataclass
class TwoTowerEncoder:
    """The world's frozen two-tower model, read from the work dir `vlcore.main` trained it in."""

    workdir: Path
    batch_size: int = 512

    def __post_init__(self):
        from vlcore.encoders.configs import CLIPVisionConfig
        from vlcore.sentence_encoder import SentenceEncoder
        from vlcore.two_tower.model import TwoTower

        self.workdir = Path(self.workdir)
        record = self.workdir / "model.json"
        if not record.is_file():
            raise EncoderError(f"{self.workdir}: no model.json; expected the work dir of a trained two-tower model")
        self.model_record = json.loads(record.read_text())
        if self.model_record.get("model") != "two_tower":
            raise EncoderError(f"{record}: holds a {self.model_record.get('model')!r} model, not a two_tower")
        self.step, params = _latest_params(self.workdir / "checkpoints")
        vision = CLIPVisionConfig(**self.model_record["vision"])
        self.image_size = vision.image_size
        self.dim = int(self.model_record["embed_dim"])
        module = TwoTower(vision, embed_dim=self.dim)
        self.params = params
        text_tower = self.model_record["text_tower"]
        self.text_encoder = SentenceEncoder(None if text_tower.startswith("bundled") else text_tower)
        self._images = DataParallelImages(
            lambda p, x: module.apply({"params": p}, x, method=TwoTower.embed_images), params, self.batch_size)
        self._patch_regions = DataParallelImages(
            lambda p, x, b: module.apply({"params": p}, x, b, method=TwoTower.embed_regions), params,
            max(1, self.batch_size // 4))
        self._fingerprint = hashlib.sha256(
            (json.dumps(self.model_record, sort_keys=True) + params_digest(params)).encode()).hexdigest()[:24]

    def fingerprint(self) -> str:
        return f"two_tower:{self._fingerprint}"

    def preprocess(self, image: Any) -> Any:
        import tensorflow as tf

        if image.shape[0] == self.image_size and image.shape[1] == self.image_size:
            return image  # the world's images already have the tower's size
        return tf.cast(tf.round(resize_and_center_crop(image, self.image_size)), tf.uint8)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        return self._images(_check_images(images, self.image_size, np.uint8))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.text_encoder.encode(list(texts))

    def encode_regions(self, images: np.ndarray, boxes: np.ndarray, method: str = "crop",
                       valid: np.ndarray | None = None) -> np.ndarray:
        """Region features [n, r, dim] (unit norm) of boxes [n, r, 4] (ymin, xmin, ymax, xmax in [0, 1]) of
        uint8 images [n, H, W, 3] at the tower's size.

        "crop": each box cut out, resized to the tower's input size (bilinear) and embedded like an
        image; "patch": one pass over the image, each box's patch tokens averaged (weighted by how
        much of each patch it covers) and projected into the embedding space. valid [n, r] bool: only
        these boxes are embedded (the others, padding, get zeros).
        """
        images = _check_images(images, self.image_size, np.uint8)
        boxes = np.asarray(boxes, np.float32)
        if boxes.ndim != 3 or boxes.shape[0] != len(images) or boxes.shape[2] != 4:
            raise EncoderError(f"encode_regions: boxes must be [{len(images)}, regions, 4], got {boxes.shape}")
        n, r = boxes.shape[:2]
        valid = np.ones((n, r), bool) if valid is None else np.asarray(valid, bool)
        out = np.zeros((n, r, self.dim), np.float32)
        if method == "patch":
            out[valid] = self._patch_regions(images, boxes)[valid]
            return out
        if method != "crop":
            raise EncoderError(f"encode_regions: method {method!r}, expected 'crop' or 'patch'")
        if not valid.any():
            return out
        import tensorflow as tf

        image_index, _ = np.nonzero(valid)
        crops = tf.image.crop_and_resize(tf.cast(images, tf.float32), boxes[valid], image_index.astype(np.int32),
                                         (self.image_size,) * 2)
        out[valid] = self.encode_images(np.clip(np.rint(crops.numpy()), 0, 255).astype(np.uint8))
        return out


def _latest_params(checkpoints: Path) -> tuple[int, Any]:
    import orbax.checkpoint as ocp

    if not checkpoints.is_dir():
        raise EncoderError(f"{checkpoints}: no checkpoints; train the model first")
    manager = ocp.CheckpointManager(checkpoints.absolute())
    step = manager.latest_step()
    if step is None:
        raise EncoderError(f"{checkpoints}: no finished checkpoint; train the model first")
    restored = manager.restore(step, args=ocp.args.StandardRestore())
    manager.close()
    return step, jax.tree.map(np.asarray, restored["params"])


@dataclasses.dataclass
class HFClipEncoder:
    """Any local HF-format CLIP checkpoint directory (config.json, safetensors, tokenizer files)."""

    path: Path
    batch_size: int = 256
    text_batch_size: int = 256

    def __post_init__(self):
        from vlcore.encoders.clip import CLIPModel
        from vlcore.hf_checkpoint import CheckpointError, load_pretrained, load_tokenizer

        self.path = Path(self.path)
        try:
            self.pretrained = load_pretrained(self.path)
            self.tokenizer = load_tokenizer(self.path)
        except CheckpointError as e:
            raise EncoderError(str(e)) from None
        if not isinstance(self.pretrained.module, CLIPModel):
            raise EncoderError(f"{self.path}: a {type(self.pretrained.module).__name__} checkpoint, expected CLIP")
        config = self.pretrained.config
        self.image_size = config.vision.image_size
        self.dim = config.projection_dim
        self.max_length = config.text.max_position_embeddings
        module = self.pretrained.module
        mean, std = jnp.asarray(CLIP_MEAN) * 255.0, jnp.asarray(CLIP_STD) * 255.0

        def images_fn(p, x):
            x = (x.astype(jnp.float32) - mean) / std
            return l2_normalize(module.apply({"params": p}, x, method=CLIPModel.get_image_features).astype(jnp.float32))

        self._images = DataParallelImages(images_fn, self.pretrained.params, self.batch_size)
        self._texts = jax.jit(lambda p, ids, mask: l2_normalize(
            module.apply({"params": p}, ids, mask, method=CLIPModel.get_text_features).astype(jnp.float32)))
        self._fingerprint = hashlib.sha256(
            (self.pretrained.hf_config.to_json_string() + params_digest(self.pretrained.params)).encode()
        ).hexdigest()[:24]

    def fingerprint(self) -> str:
        return f"hf_clip:{self._fingerprint}"

    def preprocess(self, image: Any) -> Any:
        return resize_and_center_crop(image, self.image_size)  # float32 [S, S, 3] in 0..255

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        return self._images(_check_images(images, self.image_size, np.float32))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = []
        for start in range(0, len(texts), self.text_batch_size):
            chunk = texts[start:start + self.text_batch_size]
            # Fixed length and rows: one compiled text program.
            tokens = self.tokenizer(chunk + [""] * (self.text_batch_size - len(chunk)), truncation=True,
                                    max_length=self.max_length, padding="max_length", return_tensors="np")
            out.append(np.asarray(self._texts(self.pretrained.params, tokens["input_ids"],
                                              tokens["attention_mask"]))[: len(chunk)])
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)


def load_frozen_encoder(spec: str, batch_size: int = 256) -> FrozenEncoder:
    """`two_tower:WORKDIR` or `hf_clip:DIR`."""
    kind, _, path = spec.partition(":")
    if kind == "two_tower" and path:
        return TwoTowerEncoder(Path(path), batch_size=batch_size)
    if kind == "hf_clip" and path:
        return HFClipEncoder(Path(path), batch_size=batch_size)
    raise EncoderError(f"encoder {spec!r}: expected 'two_tower:WORKDIR' or 'hf_clip:DIR'")
