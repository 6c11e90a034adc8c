"""Import and export of HF checkpoint directories (`config.json` + `model.safetensors`).

The Flax modules name their parameters after the transformers state dict, so the mapping is
mechanical: `layers_0` <-> `layers.0`; Dense `kernel` [in, out] <-> `weight` [out, in]; Conv
`kernel` [kh, kw, in, out] <-> `weight` [out, in, kh, kw]; LayerNorm `scale` and Embed
`embedding` <-> `weight`. Loading is strict: every missing, unexpected or mis-shaped tensor is
listed in one `CheckpointError`. Pre-training heads the requested model does not have (`cls.*`
when loading a bare BertModel) are dropped, as transformers drops them. Weight files are read
with `safetensors.numpy` (no torch, no pickle); `pytorch_model.bin` is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import load_file, save_file

from vlcore.encoders.bert import BertForMaskedLM, BertModel
from vlcore.encoders.clip import CLIPModel
from vlcore.encoders.configs import BertConfig, CLIPConfig
from vlcore.errors import InputError

log = logging.getLogger(__name__)

Task = Literal["base", "mlm"]
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
    "merges.txt", "added_tokens.json", "preprocessor_config.json",
)
# Tensors the tied MLM decoder aliases; some checkpoints store the copies, most do not.
TIED_ALIASES = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}


class CheckpointError(InputError):
    """A checkpoint directory that cannot be read as the requested model."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the source file stored what the Flax params do not hold, so export can write it back."""

    prefix: str = ""  # prepended to the base model's keys ("bert." inside BertForMaskedLM files)
    buffers: tuple[tuple[str, tuple[int, ...], str], ...] = ()  # (key, shape, dtype) of position_ids
    tied: tuple[str, ...] = ()  # alias keys of TIED_ALIASES present in the source
    dtype: str = "float32"  # storage dtype of the floating tensors


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A Flax encoder with its parameters and everything needed to write it back as HF."""

    module: nn.Module
    params: dict[str, Any]
    config: CLIPConfig | BertConfig
    hf_config: transformers.PretrainedConfig
    layout: Layout = Layout()
    path: Path | None = None  # the directory it was read from (tokenizer files live there)


# ----------------------------------------------------------------------------- key mapping


def hf_key(flax_path: tuple[str, ...]) -> str:
    """('encoder', 'layers_0', 'mlp', 'fc1', 'kernel') -> 'encoder.layers.0.mlp.fc1.weight'."""
    *modules, leaf = flax_path
    modules = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    return ".".join([*modules, leaf])


def to_hf_array(flax_path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if flax_path[-1] == "kernel" and value.ndim == 2:
        return value.T
    if flax_path[-1] == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    return value


def from_hf_array(flax_path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if flax_path[-1] == "kernel" and value.ndim == 2:
        return value.T
    if flax_path[-1] == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value


def hf_shape(flax_path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(to_hf_array(flax_path, np.empty(shape, np.uint8)).shape)


# ----------------------------------------------------------------------------- modules


def dummy_inputs(module: nn.Module) -> tuple[jax.Array, ...]:
    if isinstance(module, CLIPModel):
        v = module.config.vision
        return (jnp.zeros((1, v.image_size, v.image_size, v.num_channels)), jnp.zeros((1, 1), jnp.int32))
    return (jnp.zeros((1, 1), jnp.int32),)


def init_params(module: nn.Module, seed: int = 0) -> dict[str, Any]:
    """Fresh random parameters (Flax initialisers) for any encoder of this package."""
    return jax.jit(module.init)(jax.random.key(seed), *dummy_inputs(module))["params"]


def abstract_params(module: nn.Module) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    shapes = jax.eval_shape(module.init, jax.random.key(0), *dummy_inputs(module))["params"]
    return flatten_dict(shapes)


def architectures(module: nn.Module) -> list[str]:
    return [{CLIPModel: "CLIPModel", BertModel: "BertModel", BertForMaskedLM: "BertForMaskedLM"}[type(module)]]


def from_flax(module: nn.Module, params: dict[str, Any]) -> Pretrained:
    """Wraps freshly initialised or trained Flax parameters for `save_pretrained`."""
    hf_config = module.config.to_hf()
    hf_config.architectures = architectures(module)
    return Pretrained(module, params, module.config, hf_config)


# ----------------------------------------------------------------------------- reading


def read_hf_config(path: Path) -> transformers.PretrainedConfig:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; expected an HF checkpoint directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; expected an HF checkpoint directory (config.json + {WEIGHTS_NAME})")
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in ("clip", "bert"):
        raise CheckpointError(
            f"{path / 'config.json'}: model_type {model_type!r} is not supported; expected 'clip' or 'bert'"
        )
    return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a single-file or sharded (index.json) safetensors checkpoint."""
    if (path / WEIGHTS_NAME).is_file():
        files = [path / WEIGHTS_NAME]
    elif (path / WEIGHTS_INDEX_NAME).is_file():
        index = json.loads((path / WEIGHTS_INDEX_NAME).read_text())
        files = [path / name for name in sorted(set(index["weight_map"].values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path}: shards listed in {WEIGHTS_INDEX_NAME} are missing: {missing}")
    else:
        hint = " (found pytorch_model.bin: convert it to safetensors; pickles are not read)" if (
            path / "pytorch_model.bin").exists() else ""
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}{hint}")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    return tensors


def build_module(hf_config: transformers.PretrainedConfig, tensors: dict[str, np.ndarray], task: Task,
                 dtype: jnp.dtype) -> tuple[nn.Module, str]:
    """The Flax module the checkpoint and task call for, and the key prefix of its base model."""
    try:
        if hf_config.model_type == "clip":
            if task != "base":
                raise CheckpointError(f"task {task!r} does not apply to CLIP checkpoints; use 'base'")
            return CLIPModel(CLIPConfig.from_hf(hf_config), dtype), ""
        config = BertConfig.from_hf(hf_config)
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"config.json: {e}") from None
    has_prefix = any(k.startswith("bert.") for k in tensors)
    if task == "mlm":
        pooler = any(k.startswith("bert.pooler.") for k in tensors)
        return BertForMaskedLM(config, add_pooling_layer=pooler, dtype=dtype), ""
    prefix = "bert." if has_prefix else ""
    pooler = any(k.startswith(prefix + "pooler.") for k in tensors)
    return BertModel(config, add_pooling_layer=pooler, dtype=dtype), prefix


def is_dropped_head(key: str, module: nn.Module) -> bool:
    """Heads of other tasks that transformers also ignores when loading this model class."""
    if isinstance(module, BertModel):
        return key.startswith("cls.")
    if isinstance(module, BertForMaskedLM):
        return key.startswith("cls.seq_relationship.")
    return False


def load_pretrained(path: str | os.PathLike, *, task: Task = "base", dtype: jnp.dtype = jnp.float32) -> Pretrained:
    """Reads an HF CLIP or BERT/MiniLM directory into Flax parameters (float32).

    task: "base" -> CLIPModel or BertModel; "mlm" -> BertForMaskedLM (tied decoder).
    dtype: the compute dtype of the returned module (float32 or bfloat16); parameters are float32.
    """
    path = Path(path)
    hf_config = read_hf_config(path)
    tensors = read_tensors(path)
    module, prefix = build_module(hf_config, tensors, task, dtype)
    expected = {prefix + hf_key(p): (p, hf_shape(p, s.shape)) for p, s in abstract_params(module).items()}

    buffers, tied, missing, unexpected, misshaped, dropped = [], [], [], [], [], []
    for key, value in tensors.items():
        if key in expected:
            want = expected[key][1]
            if tuple(value.shape) != want:
                misshaped.append(f"{key}: checkpoint {tuple(value.shape)}, model {want}")
        elif key.endswith("position_ids"):  # a non-persistent buffer older exports still carry
            if not np.array_equal(value.reshape(-1), np.arange(value.size)):
                raise CheckpointError(f"{path}: buffer {key} is not 0..n-1; custom position ids are not supported")
            buffers.append((key, tuple(value.shape), str(value.dtype)))
        elif is_dropped_head(key, module):  # before the tied check: a bare BertModel has no decoder
            dropped.append(key)
        elif key in TIED_ALIASES and TIED_ALIASES[key] in tensors:
            if not np.array_equal(value, tensors[TIED_ALIASES[key]]):
                raise CheckpointError(f"{path}: {key} differs from {TIED_ALIASES[key]}; untied MLM decoders are not supported")
            tied.append(key)
        else:
            unexpected.append(f"{key} {tuple(value.shape)}")
    missing = [f"{k} {shape}" for k, (_, shape) in expected.items() if k not in tensors]
    if missing or unexpected or misshaped:
        parts = [f"{name} ({len(items)}): " + ", ".join(sorted(items))
                 for name, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if items]
        raise CheckpointError(
            f"{path}: tensors do not match {type(module).__name__} built from its config.json; " + "; ".join(parts)
        )
    if dropped:
        log.info("%s: ignored %d tensors of heads %s does not have", path, len(dropped), type(module).__name__)

    float_dtypes = {str(v.dtype) for v in tensors.values() if np.issubdtype(v.dtype, np.floating)}
    params = unflatten_dict({
        p: jnp.asarray(from_hf_array(p, tensors[key]).astype(np.float32)) for key, (p, _) in expected.items()
    })
    layout = Layout(prefix, tuple(sorted(buffers)), tuple(sorted(tied)),
                    float_dtypes.pop() if len(float_dtypes) == 1 else "float32")
    return Pretrained(module, params, module.config, hf_config, layout, path)


def load_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """The checkpoint's own tokenizer, from its directory (never from a hub)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    # Without vocabulary files AutoTokenizer still builds a tokenizer that maps every word to [UNK].
    vocab_files = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model")
    if not any((path / name).is_file() for name in vocab_files):
        raise CheckpointError(f"{path}: no tokenizer vocabulary (expected one of {', '.join(vocab_files)})")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: no usable tokenizer files ({e})") from None


# ----------------------------------------------------------------------------- writing


def hf_state_dict(pretrained: Pretrained) -> dict[str, np.ndarray]:
    """Flax params -> the transformers state dict (with the source's buffers and tied copies)."""
    dtype = np.dtype(pretrained.layout.dtype)
    out = {
        # np.array, not np.ascontiguousarray: the latter turns the 0-d logit_scale into shape (1,).
        pretrained.layout.prefix + hf_key(p): np.array(to_hf_array(p, np.asarray(v)).astype(dtype), order="C")
        for p, v in flatten_dict(pretrained.params).items()
    }
    for key, shape, buffer_dtype in pretrained.layout.buffers:
        out[key] = np.arange(int(np.prod(shape)), dtype=buffer_dtype).reshape(shape)
    for alias in pretrained.layout.tied:
        out[alias] = out[TIED_ALIASES[alias]].copy()
    return out


def save_pretrained(pretrained: Pretrained, out_dir: str | os.PathLike) -> Path:
    """Writes config.json + model.safetensors (+ the source's tokenizer files) into out_dir.

    Each file is written under a temporary name and renamed, so an interrupted export never
    leaves a half-written checkpoint behind.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(pretrained)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        tmp = Path(tmp)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        pretrained.hf_config.to_json_file(str(tmp / "config.json"))
        if pretrained.path is not None:
            for name in TOKENIZER_FILES:
                if (pretrained.path / name).is_file():
                    shutil.copyfile(pretrained.path / name, tmp / name)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    return out_dir
