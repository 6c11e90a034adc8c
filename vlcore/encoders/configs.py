"""Encoder configurations: frozen dataclasses read from (and written to) HF `config.json`.

Only the fields the Flax modules use are kept; everything else in an HF config is carried
through untouched by the checkpoint code, so an exported directory loads back in transformers.
"""

from __future__ import annotations

import dataclasses
import transformers

# HF `hidden_act` names this project implements.
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu")


DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob")


def _check_dropout(config) -> None:
    for name in DROPOUT_FIELDS:
        rate = getattr(config, name)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"config: {name} must be in [0, 1), got {rate}")


def with_dropout(config, rate: float | None):
    """`config` (BertConfig or VisualBertConfig) with both dropout rates set to `rate`; None keeps the
    config's own (the checkpoint's config.json values)."""
    if rate is None:
        return config
    return dataclasses.replace(config, **{name: rate for name in DROPOUT_FIELDS})


def _check_activation(name: str, where: str) -> str:
    if name not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"{where}: hidden_act {name!r} is not supported; expected one of {SUPPORTED_ACTIVATIONS}")
    return name


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # eos_token_id == 2 marks configs written before transformers PR #24773: pooling then takes
    # the argmax token id (the EOT token has the highest id in the original vocabulary).
    eos_token_id: int = 49407
    bos_token_id: int = 49406
    pad_token_id: int = 1


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text: CLIPTextConfig = CLIPTextConfig()
    vision: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_hf(cls, hf: transformers.CLIPConfig) -> "CLIPConfig":
        t, v = hf.text_config, hf.vision_config
        text = CLIPTextConfig(**{f.name: getattr(t, f.name) for f in dataclasses.fields(CLIPTextConfig)})
        vision = CLIPVisionConfig(**{f.name: getattr(v, f.name) for f in dataclasses.fields(CLIPVisionConfig)})
        _check_activation(text.hidden_act, "text_config")
        _check_activation(vision.hidden_act, "vision_config")
        if vision.image_size % vision.patch_size:
            raise ValueError(
                f"vision_config: image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}"
            )
        return cls(text, vision, hf.projection_dim, hf.logit_scale_init_value)

    def to_hf(self) -> transformers.CLIPConfig:
        return transformers.CLIPConfig(
            text_config=dataclasses.asdict(self.text),
            vision_config=dataclasses.asdict(self.vision),
            projection_dim=self.projection_dim,
            logit_scale_init_value=self.logit_scale_init_value,
        )


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # Active only when a module is called with deterministic=False (training); 0.1 in every BERT config.
    hidden_dropout_prob: float = 0.1  # embeddings, attention output, feed-forward output
    attention_probs_dropout_prob: float = 0.1  # the attention probabilities

    def __post_init__(self):
        _check_dropout(self)

    @classmethod
    def from_hf(cls, hf: transformers.BertConfig) -> "BertConfig":
        cfg = cls(**{f.name: getattr(hf, f.name) for f in dataclasses.fields(cls)})
        _check_activation(cfg.hidden_act, "config")
        position_type = getattr(hf, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"config: position_embedding_type {position_type!r} is not supported; expected 'absolute'")
        return cfg

    def to_hf(self, architectures: list[str] | None = None) -> transformers.BertConfig:
        return transformers.BertConfig(**dataclasses.asdict(self), architectures=architectures)


def check_heads(hidden_size: int, num_heads: int, where: str) -> int:
    """Returns the head dimension, or raises if the width does not split evenly."""
    if hidden_size % num_heads:
        raise ValueError(f"{where}: hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}")
    return hidden_size // num_heads


@dataclasses.dataclass(frozen=True)
class VisualBertConfig:
    """transformers' `VisualBertConfig`, restricted to what changes the Flax modules' math.

    `bypass_transformer=True` (regions skip the encoder and meet the text in one extra layer) is
    refused. `special_visual_initialize` does not change the forward pass: it only says that a
    freshly initialised model copies the text's token-type and position tables into the visual
    ones (`hf_checkpoint.visual_bert_from_bert` does so, as transformers' `__init__` does).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    visual_embedding_dim: int = 512
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 1
    num_labels: int = 2  # width of the VQA / visual-reasoning classifiers
    special_visual_initialize: bool = True
    hidden_dropout_prob: float = 0.1  # as BertConfig's; also before the VQA / visual-reasoning classifiers
    attention_probs_dropout_prob: float = 0.1

    def __post_init__(self):
        _check_activation(self.hidden_act, "config")
        _check_dropout(self)
        for name in ("vocab_size", "hidden_size", "visual_embedding_dim", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings", "type_vocab_size", "num_labels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"config: {name} must be positive, got {getattr(self, name)}")
        check_heads(self.hidden_size, self.num_attention_heads, "config")

    @property
    def bert(self) -> BertConfig:
        """The text/encoder part as a BertConfig: the BERT layers and MLM head are reused as they are."""
        return BertConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(BertConfig)})

    @classmethod
    def from_hf(cls, hf: transformers.VisualBertConfig) -> "VisualBertConfig":
        if getattr(hf, "bypass_transformer", False):
            raise ValueError("config: bypass_transformer=True is not supported (regions would skip the encoder); "
                             "expected False")
        names = [f.name for f in dataclasses.fields(cls) if f.name != "num_labels"]
        return cls(**{name: getattr(hf, name) for name in names}, num_labels=hf.num_labels)

    @classmethod
    def from_bert(cls, bert: BertConfig, visual_embedding_dim: int, **overrides) -> "VisualBertConfig":
        """A VisualBERT with the shapes of `bert` (its vocabulary, width, layers) and regions of the given width."""
        return cls(**{**dataclasses.asdict(bert), "visual_embedding_dim": visual_embedding_dim, **overrides})

    def to_hf(self, architectures: list[str] | None = None) -> transformers.VisualBertConfig:
        return transformers.VisualBertConfig(**dataclasses.asdict(self), bypass_transformer=False,
                                             architectures=architectures)
