"""BERT's dropout in the Flax BERT / VisualBERT encoders and µ-VLA's models.

The train-mode forward is checked against transformers' PyTorch VisualBERT in train mode with
every torch Dropout's mask replaced by the one the Flax Dropout drew (recovered from its output):
a dropout in the wrong place, with the wrong rate, missing or extra breaks that equality. The rest
is structure and statistics: BERT's Dropout sites are transformers' BertModel's, one key gives one
output, two keys two, rate 0 or deterministic=True gives the eval-mode output, and the rates come
from config.json unless overridden.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from conftest import assert_close, random_bert_inputs, save_random_model
from jaxmuvla.heads import DownstreamModel
from jaxmuvla.model import MuVLA, init_muvla, muvla_from_text_checkpoint
from vlcore.encoders import BertConfig, BertModel, VisualBertConfig, VisualBertForQuestionAnswering
from vlcore.encoders.configs import with_dropout
from vlcore.hf_checkpoint import load_pretrained

HIDDEN_RATE, ATTENTION_RATE = 0.3, 0.2  # different, so a dropout given the other rate scales wrongly


def recording_dropouts(calls: list):
    """Interceptor recording (HF-style module name, input, output) of every nn.Dropout call."""
    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
            name = re.sub(r"layer_(\d+)", r"layer.\1", ".".join(context.module.path))
            calls.append((name, np.asarray(args[0]), np.asarray(out)))
        return out
    return nn.intercept_methods(interceptor)


def torch_dropout_names(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)]


def test_visual_bert_train_mode_matches_transformers_with_the_same_masks(tmp_path):
    hf_config = transformers.VisualBertConfig(
        vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=20, initializer_range=0.2, visual_embedding_dim=12, num_labels=3,
        hidden_dropout_prob=HIDDEN_RATE, attention_probs_dropout_prob=ATTENTION_RATE)
    torch_model, directory = save_random_model(transformers.VisualBertForQuestionAnswering, hf_config, tmp_path,
                                               seed=7)
    pretrained = load_pretrained(directory)
    assert isinstance(pretrained.module, VisualBertForQuestionAnswering)
    assert (pretrained.config.hidden_dropout_prob, pretrained.config.attention_probs_dropout_prob) == (
        HIDDEN_RATE, ATTENTION_RATE)  # from config.json

    rng = np.random.default_rng(0)
    inputs = random_bert_inputs(rng, 3, 9, 50, 2, padded=True)
    inputs["visual_embeds"] = rng.standard_normal((3, 6, 12)).astype(np.float32)
    inputs["visual_attention_mask"] = np.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]], np.int32)

    calls = []
    with recording_dropouts(calls):
        flax_out = pretrained.module.apply({"params": pretrained.params},
                                           **{k: jnp.asarray(v) for k, v in inputs.items()},
                                           deterministic=False, rngs={"dropout": jax.random.key(5)})
    masks = {}
    for name, x, out in calls:
        assert name not in masks, f"{name} called twice"
        masks[name] = out != 0  # where the input is 0 (masked keys' probabilities) the mask does not matter
        rate = ATTENTION_RATE if name.endswith("self.dropout") else HIDDEN_RATE
        dropped = float(1 - masks[name][x != 0].mean())
        assert abs(dropped - rate) < 0.12, f"{name}: dropped {dropped:.2f} of its inputs, rate {rate}"
    # Every torch Dropout (transformers' places) drew in Flax, none elsewhere.
    assert sorted(masks) == sorted(torch_dropout_names(torch_model))

    def same_mask(module, args, out):
        # reshape: transformers keeps the VQA head's gathered token as [b, 1, H], Flax as [b, H]
        return args[0] * torch.from_numpy(masks[module.name]).reshape(args[0].shape) / (1 - module.p)
    for name, m in torch_model.named_modules():
        if isinstance(m, torch.nn.Dropout):
            m.name = name
            m.register_forward_hook(same_mask)
    torch_model.train()
    with torch.no_grad():
        ref = torch_model(**{k: torch.from_numpy(v.astype(np.int64 if v.dtype.kind == "i" else np.float32))
                             for k, v in inputs.items()}, output_hidden_states=True)
    assert_close(flax_out["last_hidden_state"], ref.hidden_states[-1], what="last_hidden_state")
    assert_close(flax_out["logits"], ref.logits, what="logits")
    eval_out = pretrained.module.apply({"params": pretrained.params}, **{k: jnp.asarray(v) for k, v in inputs.items()})
    assert np.abs(np.asarray(eval_out["logits"]) - np.asarray(flax_out["logits"])).max() > 1e-3  # dropout did act


@pytest.fixture(scope="module")
def bert():
    config = BertConfig(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=16)
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 60, (4, 10)), jnp.int32)
    mask = jnp.asarray(np.arange(10)[None] < np.array([10, 8, 6, 3])[:, None], jnp.int32)
    params = BertModel(config).init(jax.random.key(0), ids, mask)["params"]
    return config, params, ids, mask


def test_bert_dropout_sites_are_transformers_ones(bert):
    config, params, ids, mask = bert
    calls = []
    with recording_dropouts(calls):
        BertModel(config).apply({"params": params}, ids, mask, deterministic=False,
                                rngs={"dropout": jax.random.key(0)})
    torch_model = transformers.BertModel(config.to_hf())  # its config: the same rates (0.1), add_pooling_layer
    assert [name for name, _, _ in calls] == torch_dropout_names(torch_model)
    assert all(m.p == 0.1 for m in torch_model.modules() if isinstance(m, torch.nn.Dropout))


def test_bert_dropout_keys_rates_and_eval_mode(bert):
    config, params, ids, mask = bert

    def run(cfg, key=None):
        if key is None:
            return np.asarray(BertModel(cfg).apply({"params": params}, ids, mask)["last_hidden_state"])
        return np.asarray(BertModel(cfg).apply({"params": params}, ids, mask, deterministic=False,
                                               rngs={"dropout": jax.random.key(key)})["last_hidden_state"])

    eval_out = run(config)
    np.testing.assert_array_equal(run(config, 1), run(config, 1))
    assert np.abs(run(config, 1) - run(config, 2)).max() > 1e-2
    assert np.abs(run(config, 1) - eval_out).max() > 1e-2
    np.testing.assert_array_equal(run(with_dropout(config, 0.0), 1), eval_out)  # rate 0 == eval mode
    np.testing.assert_array_equal(run(with_dropout(config, 0.0)), eval_out)  # eval mode ignores the rates
    only_attention = dataclasses.replace(config, hidden_dropout_prob=0.0)
    assert np.abs(run(only_attention, 1) - eval_out).max() > 1e-3  # the attention dropout alone acts
    with pytest.raises(Exception, match="dropout"):  # no silent fixed mask without an rng
        BertModel(config).apply({"params": params}, ids, mask, deterministic=False)


def test_dropout_rates_are_checked():
    with pytest.raises(ValueError, match="hidden_dropout_prob"):
        BertConfig(hidden_dropout_prob=1.0)
    with pytest.raises(ValueError, match="attention_probs_dropout_prob"):
        VisualBertConfig(attention_probs_dropout_prob=-0.1)


def small_muvla_inputs(rng, b=2, length=7, regions=5):
    ids = rng.integers(5, 50, (b, length)).astype(np.int32)
    mask = np.arange(length)[None] < np.array([length, length - 2])[:, None]
    return (ids, mask, rng.normal(size=(b, regions, 12)).astype(np.float32),
            rng.random((b, regions, 5)).astype(np.float32), np.ones((b, regions), bool))


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_muvla_and_downstream_models_pass_deterministic_down(task):
    cfg = VisualBertConfig(vocab_size=50, hidden_size=32, visual_embedding_dim=12, num_hidden_layers=1,
                           num_attention_heads=4, intermediate_size=48, max_position_embeddings=16)
    rng = np.random.default_rng(0)
    x = small_muvla_inputs(rng)
    if task == "nlvr2":
        x = tuple(np.stack([a, a[::-1]], axis=1) for a in x)
    model = DownstreamModel(cfg, task, 3)
    params = model.init(jax.random.key(0), *x)
    train = lambda key, m=model: m.apply(params, *x, deterministic=False, rngs={"dropout": jax.random.key(key)})  # noqa: E731
    np.testing.assert_array_equal(train(1), train(1))
    assert np.abs(np.asarray(train(1) - train(2))).max() > 1e-3
    np.testing.assert_array_equal(DownstreamModel(with_dropout(cfg, 0.0), task, 3).apply(
        params, *x, deterministic=False, rngs={"dropout": jax.random.key(1)}), model.apply(params, *x))

    muvla = MuVLA(cfg, num_classes=4)
    mp = {"params": init_muvla(muvla)}
    y = small_muvla_inputs(rng)
    encode = lambda **kw: muvla.apply(mp, y[0], y[1], None, None, *y[2:], method=MuVLA.encode, **kw)[1]  # noqa: E731
    a = encode(deterministic=False, rngs={"dropout": jax.random.key(1)})
    b = encode(deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert np.abs(np.asarray(a - b)).max() > 1e-3
    off = MuVLA(with_dropout(cfg, 0.0), num_classes=4)
    np.testing.assert_array_equal(off.apply(mp, y[0], y[1], None, None, *y[2:], method=MuVLA.encode,
                                            deterministic=False, rngs={"dropout": jax.random.key(1)})[1], encode())
    assert np.abs(np.asarray(muvla.apply(mp, *y, deterministic=False, rngs={"dropout": jax.random.key(1)})[2]
                             - muvla.apply(mp, *y)[2])).max() > 1e-4  # __call__ passes it down too


def test_muvla_from_text_checkpoint_rates():
    from vlcore.sentence_encoder import bundled_minilm_path

    raw = json.loads((Path(bundled_minilm_path()) / "config.json").read_text())
    kwargs = dict(num_layers=1, feature_dim=12, num_classes=4, max_text_length=16)
    own = muvla_from_text_checkpoint(None, **kwargs).module.config
    assert (own.hidden_dropout_prob, own.attention_probs_dropout_prob) == (
        raw["hidden_dropout_prob"], raw["attention_probs_dropout_prob"])
    off = muvla_from_text_checkpoint(None, dropout=0.0, **kwargs).module.config
    assert (off.hidden_dropout_prob, off.attention_probs_dropout_prob) == (0.0, 0.0)


def test_fresh_embeddings_start_at_the_word_embeddings_scale():
    """A tag word piece is its word embedding plus its region's box embedding, summed before one
    LayerNorm. With the box LayerNorm's scale at 1 the box part has norm sqrt(hidden) (19.6) against
    the word's ~1: the word is drowned. balance_fresh_embeddings brings the box embedding and the
    visual projection (for features of the given norm) to the mean word norm, computed here in numpy."""
    from jaxmuvla.model import muvla_from_text_checkpoint

    feature_norm = 19.6
    plain = muvla_from_text_checkpoint(None, num_layers=1, feature_dim=16, num_classes=3, max_text_length=12)
    balanced = muvla_from_text_checkpoint(None, num_layers=1, feature_dim=16, num_classes=3, max_text_length=12,
                                          feature_norm=feature_norm)
    words = np.asarray(balanced.params["visual_bert"]["embeddings"]["word_embeddings"]["embedding"])
    word_norm = np.linalg.norm(words, axis=1).mean()
    hidden = words.shape[1]
    np.testing.assert_allclose(plain.params["box_embedding"]["LayerNorm"]["scale"], 1.0)  # the drowning default
    np.testing.assert_allclose(balanced.params["box_embedding"]["LayerNorm"]["scale"], word_norm / np.sqrt(hidden),
                               rtol=1e-6)
    # the box embedding's output norm (LayerNorm with zero bias: scale x sqrt(hidden)) is the word norm
    box = balanced.module.bind({"params": balanced.params}).box_embedding(jnp.asarray([[0.1, 0.2, 0.5, 0.6, 0.12]]))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(box)), word_norm, rtol=1e-3)
    # the projection of features of norm feature_norm has about the word norm
    rng = np.random.default_rng(0)
    features = rng.standard_normal((512, 16))
    features *= feature_norm / np.linalg.norm(features, axis=1, keepdims=True)
    kernel = np.asarray(balanced.params["visual_bert"]["embeddings"]["visual_projection"]["kernel"])
    plain_kernel = np.asarray(plain.params["visual_bert"]["embeddings"]["visual_projection"]["kernel"])
    np.testing.assert_allclose(kernel / plain_kernel, (kernel / plain_kernel)[0, 0], rtol=1e-5)  # one factor
    assert np.linalg.norm(features @ plain_kernel, axis=1).mean() > 2 * word_norm  # what it fixes
    assert 0.8 < np.linalg.norm(features @ kernel, axis=1).mean() / word_norm < 1.25
    # the tensors copied from the checkpoint are untouched
    np.testing.assert_array_equal(words, plain.params["visual_bert"]["embeddings"]["word_embeddings"]["embedding"])
