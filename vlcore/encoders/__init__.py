"""Flax CLIP and BERT encoders that load transformers checkpoints and match their outputs."""

from vlcore.encoders.bert import BertForMaskedLM, BertModel
from vlcore.encoders.clip import CLIPModel
from vlcore.encoders.configs import BertConfig, CLIPConfig, CLIPTextConfig, CLIPVisionConfig

__all__ = ["BertConfig", "BertForMaskedLM", "BertModel", "CLIPConfig", "CLIPModel", "CLIPTextConfig", "CLIPVisionConfig"]
