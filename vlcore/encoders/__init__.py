"""Flax CLIP, BERT and VisualBERT encoders that load transformers checkpoints and match their outputs."""

from vlcore.encoders.bert import BertForMaskedLM, BertModel
from vlcore.encoders.clip import CLIPModel
from vlcore.encoders.configs import BertConfig, CLIPConfig, CLIPTextConfig, CLIPVisionConfig, VisualBertConfig
from vlcore.encoders.visual_bert import (
    VisualBertForPreTraining,
    VisualBertForQuestionAnswering,
    VisualBertForRegionToPhraseAlignment,
    VisualBertForVisualReasoning,
    VisualBertModel,
)

__all__ = [
    "BertConfig", "BertForMaskedLM", "BertModel", "CLIPConfig", "CLIPModel", "CLIPTextConfig", "CLIPVisionConfig",
    "VisualBertConfig", "VisualBertForPreTraining", "VisualBertForQuestionAnswering",
    "VisualBertForRegionToPhraseAlignment", "VisualBertForVisualReasoning", "VisualBertModel",
]
