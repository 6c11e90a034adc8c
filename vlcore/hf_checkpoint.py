"""Import and export of HF checkpoint directories (`config.json` + `model.safetensors`).

The Flax modules name their parameters after the transformers state dict, so the mapping is
mechanical: `layers_0` <-> `layers.0`; Dense `kernel` [in, out] <-> `weight` [out, in]; Conv
`kernel` [kh, kw, in, out] <-> `weight` [out, in, kh, kw]; LayerNorm `scale` and Embed
`embedding` <-> `weight`. Models: CLIP, BERT (`BertModel`, `BertForMaskedLM`) and VisualBERT
(`VisualBertModel` and the pre-training, VQA, NLVR2 and region-to-phrase heads).

Loading is strict, as transformers' loading is for the base model: every missing, unexpected or
mis-shaped tensor is an error, reported as one `CheckpointError` that summarises them (counts, a
few names, the likely cause). What transformers also tolerates is tolerated the same way:
- heads of another class than the requested one are dropped (`cls.*` when loading a bare encoder
  from a BertForMaskedLM file);
- a head the checkpoint cannot have, because it is a bare base model (a sentence-transformers
  BertModel loaded with task="mlm") or a model of another class (a VisualBertForPreTraining file
  loaded for VQA), is initialised with the Flax initialisers, with one warning naming it. A file
  whose `architectures` names the requested class itself must hold its head.
Weight files are read with `safetensors.numpy` (no torch, no pickle); `pytorch_model.bin` is refused.
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
from vlcore.encoders.configs import BertConfig, CLIPConfig, VisualBertConfig
from vlcore.encoders.visual_bert import (
    VISUAL_BERT_CLASSES,
    VisualBertForPreTraining,
    VisualBertForRegionToPhraseAlignment,
    VisualBertModel,
)
from vlcore.errors import InputError

log = logging.getLogger(__name__)

# "base": CLIPModel / BertModel / VisualBertModel; "mlm": BertForMaskedLM; the others VisualBERT heads.
Task = Literal["base", "mlm", "pretraining", "vqa", "nlvr2", "region_to_phrase"]
BERT_TASKS = {"base": "BertModel", "mlm": "BertForMaskedLM"}
VISUAL_BERT_TASKS = {
    "base": "VisualBertModel",
    "pretraining": "VisualBertForPreTraining",
    "vqa": "VisualBertForQuestionAnswering",
    "nlvr2": "VisualBertForVisualReasoning",
    "region_to_phrase": "VisualBertForRegionToPhraseAlignment",
}
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
    "merges.txt", "added_tokens.json", "preprocessor_config.json",
)
# Tensors the tied MLM decoder aliases in BertForMaskedLM files; some checkpoints store the copies,
# most do not. VisualBERT's pre-training heads alias `visual_bert.embeddings...` (see tied_aliases).
TIED_ALIASES = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
HEAD_ROOTS = ("cls", "attention")  # top-level head modules of the BERT / VisualBERT head classes
EXAMPLES = 3  # names shown per kind of mismatch (all of them up to twice as many)


class CheckpointError(InputError):
    """A checkpoint directory that cannot be read as the requested model."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the source file stored what the Flax params do not hold, so export can write it back."""

    prefix: str = ""  # prepended to the base model's keys ("bert." inside BertForMaskedLM files)
    buffers: tuple[tuple[str, tuple[int, ...], str], ...] = ()  # (key, shape, dtype) of position_ids
    tied: tuple[str, ...] = ()  # alias keys of tied_aliases(module) present in the source
    dtype: str = "float32"  # storage dtype of the floating tensors


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A Flax encoder with its parameters and everything needed to write it back as HF."""

    module: nn.Module
    params: dict[str, Any]
    config: CLIPConfig | BertConfig | VisualBertConfig
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


def dummy_inputs(module: nn.Module) -> tuple[tuple[jax.Array, ...], dict[str, jax.Array]]:
    """(args, kwargs) that make `module.init` create every parameter."""
    if isinstance(module, CLIPModel):
        v = module.config.vision
        return (jnp.zeros((1, v.image_size, v.image_size, v.num_channels)), jnp.zeros((1, 1), jnp.int32)), {}
    if isinstance(module.config, VisualBertConfig):
        kwargs = {"visual_embeds": jnp.zeros((1, 1, module.config.visual_embedding_dim))}
        if isinstance(module, VisualBertForRegionToPhraseAlignment):
            kwargs["region_to_phrase_position"] = jnp.zeros((1, 1), jnp.int32)
        return (jnp.zeros((1, 2), jnp.int32),), kwargs
    return (jnp.zeros((1, 1), jnp.int32),), {}


def init_params(module: nn.Module, seed: int = 0) -> dict[str, Any]:
    """Fresh random parameters (Flax initialisers) for any encoder of this package."""
    args, kwargs = dummy_inputs(module)
    return jax.jit(lambda key: module.init(key, *args, **kwargs))(jax.random.key(seed))["params"]


def abstract_params(module: nn.Module) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    args, kwargs = dummy_inputs(module)
    shapes = jax.eval_shape(lambda key: module.init(key, *args, **kwargs), jax.random.key(0))["params"]
    return flatten_dict(shapes)


def architectures(module: nn.Module) -> list[str]:
    """The transformers class of a module (the Flax classes carry transformers' class names)."""
    name = type(module).__name__
    known = {"CLIPModel", *BERT_TASKS.values(), *VISUAL_BERT_TASKS.values()}
    if name not in known:
        raise TypeError(f"{name} is not an HF-compatible encoder of vlcore.encoders")
    return [name]


def base_attr(module: nn.Module) -> str:
    """The attribute holding the base model inside a head model ("bert", "visual_bert"), or ""."""
    if isinstance(module, BertForMaskedLM):
        return "bert"
    if isinstance(module.config, VisualBertConfig) and not isinstance(module, VisualBertModel):
        return "visual_bert"
    return ""


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """Decoder tensors some files store although they equal another tensor (canonical names)."""
    if isinstance(module, BertForMaskedLM):
        return TIED_ALIASES
    if isinstance(module, (VisualBertForPreTraining, VisualBertForRegionToPhraseAlignment)):
        return {"cls.predictions.decoder.weight": "visual_bert.embeddings.word_embeddings.weight",
                "cls.predictions.decoder.bias": "cls.predictions.bias"}
    return {}


def from_flax(module: nn.Module, params: dict[str, Any]) -> Pretrained:
    """Wraps freshly initialised or trained Flax parameters for `save_pretrained`."""
    hf_config = module.config.to_hf()
    hf_config.architectures = architectures(module)
    return Pretrained(module, params, module.config, hf_config)


# ----------------------------------------------------------------------------- reading


def read_hf_config(path: Path) -> transformers.PretrainedConfig:
    path = Path(path)
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
    if model_type not in ("clip", "bert", "visual_bert"):
        raise CheckpointError(
            f"{path / 'config.json'}: model_type {model_type!r} is not supported; expected 'clip', 'bert' or "
            "'visual_bert'"
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


def declared_class(hf_config: transformers.PretrainedConfig) -> str | None:
    """The transformers class config.json's `architectures` names (the first one), if any."""
    names = getattr(hf_config, "architectures", None) or []
    return names[0] if names else None


def _visual_bert_task(hf_config: transformers.PretrainedConfig) -> str:
    declared = declared_class(hf_config)
    for task, name in VISUAL_BERT_TASKS.items():
        if name == declared:
            return task
    return "base"


def build_module(hf_config: transformers.PretrainedConfig, tensors: dict[str, np.ndarray], task: Task | None,
                 dtype: jnp.dtype, num_labels: int | None = None) -> tuple[nn.Module, str]:
    """The Flax module the checkpoint and task call for, and the prefix of the base model's keys in
    the checkpoint ("bert." / "visual_bert." in head-model files, "" in bare base-model files)."""
    model_type = hf_config.model_type
    if num_labels is not None and model_type != "visual_bert":
        raise CheckpointError(f"num_labels applies to VisualBERT's vqa and nlvr2 heads, not to {model_type} checkpoints")
    try:
        if model_type == "clip":
            if task not in (None, "base"):
                raise CheckpointError(f"task {task!r} does not apply to CLIP checkpoints; use 'base'")
            return CLIPModel(CLIPConfig.from_hf(hf_config), dtype), ""
        if model_type == "bert":
            task = task or "base"
            if task not in BERT_TASKS:
                raise CheckpointError(f"task {task!r} does not apply to BERT checkpoints; use one of "
                                      f"{sorted(BERT_TASKS)} (the other tasks are VisualBERT heads)")
            config = BertConfig.from_hf(hf_config)
        else:
            task = task or _visual_bert_task(hf_config)
            if task not in VISUAL_BERT_TASKS:
                hint = " (its masked-LM head is the one of task 'pretraining')" if task == "mlm" else ""
                raise CheckpointError(f"task {task!r} does not apply to VisualBERT checkpoints{hint}; use one of "
                                      f"{sorted(VISUAL_BERT_TASKS)}")
            config = VisualBertConfig.from_hf(hf_config)
            if num_labels is not None:
                config = dataclasses.replace(config, num_labels=num_labels)
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"config.json: {e}") from None
    base_prefix = "bert." if model_type == "bert" else "visual_bert."
    prefix = base_prefix if any(k.startswith(base_prefix) for k in tensors) else ""
    pooler = any(k.startswith(prefix + "pooler.") for k in tensors)
    if model_type == "bert":
        if task == "mlm":
            return BertForMaskedLM(config, add_pooling_layer=pooler, dtype=dtype), prefix
        return BertModel(config, add_pooling_layer=pooler, dtype=dtype), prefix
    if task == "base":
        return VisualBertModel(config, add_pooling_layer=pooler, dtype=dtype), prefix
    return VISUAL_BERT_CLASSES[VISUAL_BERT_TASKS[task]](config, dtype=dtype), prefix


def _common_prefix(keys: list[str]) -> str:
    parts = [k.split(".")[:-1] for k in keys]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _listing(items: list[str]) -> str:
    """All items when they are few, else the first EXAMPLES of them and how many more."""
    items = sorted(items)
    if len(items) <= 2 * EXAMPLES:
        return ", ".join(items)
    return ", ".join(items[:EXAMPLES]) + f", ... and {len(items) - EXAMPLES} more"


def _layer_count(names, pattern=re.compile(r"(?:^|\.)(?:encoder\.layer|encoder\.layers)\.(\d+)\.")) -> int | None:
    layers = {int(m.group(1)) for n in names if (m := pattern.search(n))}
    return max(layers) + 1 if layers else None


def likely_cause(module: nn.Module, tensors: dict[str, np.ndarray], expected: dict[str, tuple],
                 missing: list[str], unexpected: list[str], misshaped: list[str], declared: str | None,
                 head_keys: set[str]) -> str:
    """One sentence on why the tensors do not fit, from the commonest ways they fail to."""
    cfg = module.config
    name = type(module).__name__
    if not any(k in tensors for k in expected):
        sample = ", ".join(sorted(tensors)[:3])
        return (f"none of the checkpoint's {len(tensors)} tensors has a name {name} expects (first names: "
                f"{sample}): the weights are not a {name}, or config.json comes from another model")
    text = getattr(cfg, "text", cfg)  # CLIP: its text tower
    table = next((v for k, v in tensors.items()
                  if k.endswith(("word_embeddings.weight", "token_embedding.weight"))), None)
    if table is not None and table.ndim == 2 and hasattr(text, "hidden_size"):
        if table.shape[1] != text.hidden_size:
            return (f"the checkpoint's hidden_size {table.shape[1]} differs from config.json's "
                    f"{text.hidden_size}: the weights and config.json come from different models")
        if table.shape[0] != text.vocab_size:
            return (f"the checkpoint's vocabulary of {table.shape[0]} tokens differs from config.json's vocab_size "
                    f"{text.vocab_size}")
    have, want = _layer_count(tensors), _layer_count(expected)
    if have is not None and want is not None and have != want:
        return f"the checkpoint has {have} encoder layers, config.json's num_hidden_layers says {want}"
    missing_keys = [m.split(" ")[0] for m in missing]
    if missing_keys and all(k in head_keys for k in missing_keys) and not unexpected and not misshaped:
        head = _common_prefix(missing_keys) or "head"
        return (f"the checkpoint declares {declared or 'no architecture'} but lacks the {head} head of {name}: "
                f"the file is incomplete (load it with task='base' for the encoder alone)")
    if any(m.startswith("cls.weight") for m in misshaped):
        rows = tensors["cls.weight"].shape[0]
        return f"the checkpoint's classifier has {rows} labels, config.json's num_labels {cfg.num_labels}: pass num_labels={rows}"
    if misshaped:
        return "some shapes differ from config.json: the weights and config.json do not belong together"
    return "the weights file was edited, truncated, or written by a model with other modules"


def mismatch_error(path: Path, module: nn.Module, n_tensors: int, missing: list[str], unexpected: list[str],
                   misshaped: list[str], cause: str) -> CheckpointError:
    lines = [f"{path}: tensors do not match {type(module).__name__} built from its config.json "
             f"({n_tensors} tensors in the checkpoint)"]
    for kind, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            lines.append(f"  {kind} ({len(items)}): {_listing(items)}")
    lines.append(f"  likely cause: {cause}")
    return CheckpointError("\n".join(lines))


def load_pretrained(path: str | os.PathLike, *, task: Task | None = None, dtype: jnp.dtype = jnp.float32,
                    num_labels: int | None = None, seed: int = 0) -> Pretrained:
    """Reads an HF CLIP, BERT/MiniLM or VisualBERT directory into Flax parameters (float32).

    task: "base" -> CLIPModel, BertModel or VisualBertModel; "mlm" -> BertForMaskedLM (tied
    decoder); "pretraining", "vqa", "nlvr2", "region_to_phrase" -> the VisualBERT head models.
    None: "base" for CLIP and BERT, the class config.json's `architectures` names for VisualBERT.
    dtype: the compute dtype of the returned module (float32 or bfloat16); parameters are float32.
    num_labels: VisualBERT vqa/nlvr2 classifier width instead of config.json's.
    seed: for the Flax initialisers of a head the checkpoint cannot hold (see the module docstring).
    """
    path = Path(path)
    hf_config = read_hf_config(path)
    tensors = read_tensors(path)
    pretrained, _ = _load(path, hf_config, tensors, task, dtype, num_labels, seed)
    return pretrained


def _load(path: Path, hf_config, tensors, task, dtype, num_labels, seed) -> tuple[Pretrained, list[str]]:
    """load_pretrained; also returns the head modules it initialised (HF names, e.g. "cls.predictions")."""
    module, ckpt_prefix = build_module(hf_config, tensors, task, dtype, num_labels)
    name, declared = type(module).__name__, declared_class(hf_config)
    attr = base_attr(module)
    module_prefix = attr + "." if attr else ""

    def ckpt_name(key: str) -> str:  # the module's HF name -> the checkpoint's name for it
        if not module_prefix:
            return ckpt_prefix + key
        if key.startswith(module_prefix):
            return ckpt_prefix + key[len(module_prefix):]
        return key  # a head: at the top level in every HF head-model file

    expected = {ckpt_name(hf_key(p)): (p, hf_shape(p, s.shape)) for p, s in abstract_params(module).items()}
    heads: dict[str, list[str]] = {}  # the module's head groups (top-level modules beside the base)
    for key, (p, _) in expected.items():
        if module_prefix and p[0] != attr:
            heads.setdefault(p[0], []).append(key)
    head_keys = {k for keys in heads.values() for k in keys}
    # A head may be initialised when the file cannot hold it: a bare base model, or another class.
    may_init = bool(module_prefix) and (ckpt_prefix == "" or (declared is not None and declared != name))
    aliases = tied_aliases(module)

    def is_other_head(key: str) -> bool:  # a top-level head module of some BERT / VisualBERT class
        return hf_config.model_type != "clip" and key.split(".")[0] in HEAD_ROOTS

    buffers, tied, unexpected, misshaped, dropped = [], [], [], [], []
    for key, value in tensors.items():
        if key in expected:
            want = expected[key][1]
            if tuple(value.shape) != want:
                misshaped.append(f"{key}: checkpoint {tuple(value.shape)}, model {want}")
        elif key.endswith("position_ids"):  # a non-persistent buffer older exports still carry
            if not np.array_equal(value.reshape(-1), np.arange(value.size)):
                raise CheckpointError(f"{path}: buffer {key} is not 0..n-1; custom position ids are not supported")
            buffers.append((key, tuple(value.shape), str(value.dtype)))
        elif key in aliases and aliases[key] in tensors:
            if not np.array_equal(value, tensors[aliases[key]]):
                raise CheckpointError(f"{path}: {key} differs from {aliases[key]}; untied MLM decoders are not supported")
            tied.append(key)
        elif is_other_head(key) and (not module_prefix or declared != name):
            dropped.append(key)  # heads of another class, as transformers ignores them
        else:
            unexpected.append(f"{key} {tuple(value.shape)}")

    initialise = [g for g, keys in heads.items() if may_init and not any(k in tensors for k in keys)]
    skip = {k for g in initialise for k in heads[g]}
    missing = [f"{k} {shape}" for k, (_, shape) in expected.items() if k not in tensors and k not in skip]
    if missing or unexpected or misshaped:
        cause = likely_cause(module, tensors, expected, missing, unexpected, misshaped, declared, head_keys)
        raise mismatch_error(path, module, len(tensors), missing, unexpected, misshaped, cause)
    if dropped:
        log.info("%s: ignored %d tensors of heads %s does not have", path, len(dropped), name)

    float_dtypes = {str(v.dtype) for v in tensors.values() if np.issubdtype(v.dtype, np.floating)}
    flat = {p: jnp.asarray(from_hf_array(p, tensors[key]).astype(np.float32))
            for key, (p, _) in expected.items() if key not in skip}
    initialised_heads = []
    if initialise:
        fresh = flatten_dict(init_params(module, seed))
        flat.update({p: fresh[p] for key, (p, _) in expected.items() if key in skip})
        initialised_heads = [_common_prefix(heads[g]) or g for g in initialise]
        log.warning(
            "%s: the checkpoint (%s) has no %s head for %s; initialised %d tensors (%s) with the Flax "
            "initialisers (seed %d): train them before use", path,
            f"a bare {hf_config.model_type} base model" if not ckpt_prefix else declared,
            " and ".join(initialised_heads), name, len(skip), ", ".join(f"{h}.*" for h in initialised_heads), seed)
    if module_prefix:
        # Head models are written back in their own class's layout (what transformers would save).
        buffers = [(module_prefix + k if not k.startswith(module_prefix) else k, s, d) for k, s, d in buffers]
        if declared != name:
            hf_config.architectures = [name]
    if num_labels is not None:
        hf_config.num_labels = num_labels
    layout = Layout("" if module_prefix else ckpt_prefix, tuple(sorted(buffers)), tuple(sorted(tied)),
                    float_dtypes.pop() if len(float_dtypes) == 1 else "float32")
    return Pretrained(module, unflatten_dict(flat), module.config, hf_config, layout, path), initialised_heads


# Config fields a BERT's weights fix: a VisualBERT initialised from it must have the same.
BERT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps")


def visual_bert_from_bert(bert_dir: str | os.PathLike, visual_embedding_dim: int | None = None, *,
                          task: Task = "base", num_labels: int | None = None,
                          config: VisualBertConfig | None = None,
                          dtype: jnp.dtype = jnp.float32, seed: int = 0) -> Pretrained:
    """A VisualBERT initialised from any HF BERT directory (bare, MLM or pre-training layout), or
    read from a VisualBERT directory (`load_pretrained(dir, task=task)`, checked against the request).

    Copied from the BERT: the text embeddings (word, position, token type, LayerNorm), the encoder,
    the pooler if the file has one, and the MLM head (`cls.predictions`) if the file has one and
    the task's model has it ("pretraining", "region_to_phrase"). Freshly initialised (Flax
    initialisers, `seed`): `visual_projection`, the task's other heads, and whatever the BERT lacks;
    the visual token-type and position tables are copies of the text ones when
    `config.special_visual_initialize` (the default, as transformers initialises them), else fresh.
    One warning lists what was initialised.

    config: the VisualBertConfig wanted; by default the BERT's shapes with `visual_embedding_dim`
    and `num_labels` (default 2, or a VisualBERT directory's own). A checkpoint whose vocabulary,
    width, layers... (or, for VisualBERT, region width) differ from it is a CheckpointError.
    """
    path = Path(bert_dir)
    hf_config = read_hf_config(path)
    if task not in VISUAL_BERT_TASKS:
        raise CheckpointError(f"task {task!r} is not a VisualBERT task; use one of {sorted(VISUAL_BERT_TASKS)}")
    if hf_config.model_type == "visual_bert":
        return _visual_bert_as_requested(path, hf_config, visual_embedding_dim, task, num_labels, config, dtype, seed)
    if hf_config.model_type != "bert":
        raise CheckpointError(f"{path}: model_type {hf_config.model_type!r}; visual_bert_from_bert reads a BERT "
                              "(or VisualBERT) checkpoint")
    num_labels = 2 if num_labels is None else num_labels
    tensors = read_tensors(path)
    has_mlm = any(k.startswith("cls.predictions.") for k in tensors)
    bert, _ = _load(path, hf_config, tensors, "mlm" if has_mlm else "base", jnp.float32, None, seed)
    bert_config: BertConfig = bert.config
    if config is None:
        if visual_embedding_dim is None:
            raise ValueError("visual_bert_from_bert: give visual_embedding_dim or a config")
        try:
            config = VisualBertConfig.from_bert(bert_config, visual_embedding_dim, num_labels=num_labels)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    elif visual_embedding_dim is not None and visual_embedding_dim != config.visual_embedding_dim:
        raise ValueError(f"visual_embedding_dim {visual_embedding_dim} != config.visual_embedding_dim "
                         f"{config.visual_embedding_dim}")
    differ = [f"{f} {getattr(bert_config, f)} != {getattr(config, f)}" for f in BERT_FIELDS
              if getattr(bert_config, f) != getattr(config, f)]
    if differ:
        raise CheckpointError(f"{path}: the BERT does not fit the requested VisualBertConfig (BERT's value != "
                              f"requested): {'; '.join(differ)}. Its embeddings, encoder and MLM head are copied "
                              "as they are: request the BERT's shapes (VisualBertConfig.from_bert)")

    module = VISUAL_BERT_CLASSES[VISUAL_BERT_TASKS[task]](config, dtype=dtype)
    params = flatten_dict(init_params(module, seed))
    source = flatten_dict(bert.params)
    base = ("visual_bert",) if base_attr(module) else ()
    source_base = ("bert",) if isinstance(bert.module, BertForMaskedLM) else ()
    visual_copies = {"visual_token_type_embeddings": "token_type_embeddings",
                     "visual_position_embeddings": "position_embeddings"} if config.special_visual_initialize else {}
    initialised, copied = [], 0
    for p in params:
        if p[:len(base)] == base:
            rel = p[len(base):]
            if rel[0] == "embeddings" and rel[1] in visual_copies:
                rel = (rel[0], visual_copies[rel[1]], *rel[2:])
            src = source_base + rel
        else:
            src = p if p[:2] == ("cls", "predictions") else None
        if src in source:
            params[p] = source[src]
            copied += 1
        else:
            initialised.append(hf_key(p).rsplit(".", 1)[0])
    modules = sorted(m for m in set(initialised) if not any(m.startswith(a + ".") for a in initialised))
    log.warning("%s: %s initialised from this BERT: %d tensors copied%s; freshly initialised (seed %d): %s", path,
                type(module).__name__, copied,
                " (visual token-type/position tables = the text ones)" if visual_copies else "", seed,
                ", ".join(modules))
    return Pretrained(module, unflatten_dict(params), config, config.to_hf([type(module).__name__]),
                      Layout(dtype=bert.layout.dtype), path)


def _visual_bert_as_requested(path, hf_config, visual_embedding_dim, task, num_labels, config, dtype, seed):
    """visual_bert_from_bert on a VisualBERT directory: the checkpoint itself, if it fits the request."""
    if config is not None and num_labels is None:
        num_labels = config.num_labels
    pretrained, _ = _load(path, hf_config, read_tensors(path), task, dtype,
                          num_labels if task in ("vqa", "nlvr2") else None, seed)
    have: VisualBertConfig = pretrained.config
    wanted = {} if config is None else {f: getattr(config, f) for f in (*BERT_FIELDS, "visual_embedding_dim")}
    if visual_embedding_dim is not None:
        wanted["visual_embedding_dim"] = visual_embedding_dim
    differ = [f"{f} {getattr(have, f)} != {v}" for f, v in wanted.items() if getattr(have, f) != v]
    if differ:
        raise CheckpointError(f"{path}: the VisualBERT does not fit the request (checkpoint's value != requested): "
                              f"{'; '.join(differ)}")
    return pretrained


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
    aliases = tied_aliases(pretrained.module)
    for alias in pretrained.layout.tied:
        out[alias] = out[aliases[alias]].copy()
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
