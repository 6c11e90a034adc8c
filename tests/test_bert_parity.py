"""Flax BERT vs transformers' PyTorch BertModel / BertForMaskedLM on random checkpoints (fp32, <= 1e-4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from conftest import assert_close, random_bert_inputs, save_random_model, small_bert_config
from vlcore.encoders.bert import BertForMaskedLM, BertModel
from vlcore.hf_checkpoint import CheckpointError, load_pretrained

CONFIGS = {
    "gelu-w32-h4-l2": dict(),
    "gelu_new-w48-h6-l3": dict(
        vocab_size=97, hidden_size=48, num_attention_heads=6, num_hidden_layers=3, intermediate_size=64,
        type_vocab_size=3, max_position_embeddings=40, hidden_act="gelu_new", layer_norm_eps=1e-5,
    ),
    "relu-w24-h2-l1": dict(
        vocab_size=37, hidden_size=24, num_attention_heads=2, num_hidden_layers=1, intermediate_size=100,
        type_vocab_size=4, max_position_embeddings=16, hidden_act="relu", pad_token_id=3,
    ),
}
KINDS = {"base": transformers.BertModel, "mlm": transformers.BertForMaskedLM}


@pytest.fixture(scope="module", params=[(k, c) for k in KINDS for c in CONFIGS], ids=lambda p: f"{p[0]}-{p[1]}")
def bert_case(request, tmp_path_factory):
    kind, name = request.param
    seed = 200 + 10 * list(KINDS).index(kind) + list(CONFIGS).index(name)
    torch_model, directory = save_random_model(
        KINDS[kind], small_bert_config(**CONFIGS[name]), tmp_path_factory.mktemp(f"bert-{kind}"), seed=seed
    )
    return dict(kind=kind, torch=torch_model, pretrained=load_pretrained(directory, task=kind), dir=directory,
                seed=seed)


def run_flax(pretrained, ids, mask, types):
    module = pretrained.module
    fn = jax.jit(lambda params, *args: module.apply({"params": params}, *args))
    as_j = lambda x: None if x is None else jnp.asarray(x, jnp.int32)  # noqa: E731
    return fn(pretrained.params, as_j(ids), as_j(mask), as_j(types))


def run_torch(model, ids, mask, types):
    as_t = lambda x: None if x is None else torch.from_numpy(np.asarray(x, np.int64))  # noqa: E731
    with torch.no_grad():
        return model(input_ids=as_t(ids), attention_mask=as_t(mask), token_type_ids=as_t(types))


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("batch", [1, 4])
def test_bert_matches_transformers(bert_case, batch, padded):
    pretrained, tm, kind = bert_case["pretrained"], bert_case["torch"], bert_case["kind"]
    cfg = pretrained.config
    if kind == "base":
        assert isinstance(pretrained.module, BertModel) and pretrained.module.add_pooling_layer
    else:
        assert isinstance(pretrained.module, BertForMaskedLM) and not pretrained.module.add_pooling_layer
    rng = np.random.default_rng(bert_case["seed"] + 2 * batch + padded)
    seq = min(13, cfg.max_position_embeddings) if padded else cfg.max_position_embeddings
    inputs = random_bert_inputs(rng, batch, seq, cfg.vocab_size, cfg.type_vocab_size, padded)
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]
    if not padded:
        mask = None  # both sides default to attending everywhere
        if batch == 1:
            types = None  # both sides default to token type 0
    assert types is None or types.max() > 0 or cfg.type_vocab_size == 1

    out = run_flax(pretrained, ids, mask, types)
    ref = run_torch(tm, ids, mask, types)

    if kind == "base":
        assert_close(out["last_hidden_state"], ref.last_hidden_state, what="last_hidden_state")
        assert_close(out["pooler_output"], ref.pooler_output, what="pooler_output")
    else:
        with torch.no_grad():
            as_t = lambda x: None if x is None else torch.from_numpy(np.asarray(x, np.int64))  # noqa: E731
            hidden = tm.bert(input_ids=as_t(ids), attention_mask=as_t(mask), token_type_ids=as_t(types))
        assert_close(out["last_hidden_state"], hidden.last_hidden_state, what="last_hidden_state")
        assert out["logits"].shape == (batch, seq, cfg.vocab_size)
        assert_close(out["logits"], ref.logits, what="logits")
    if padded:  # the real tokens alone also agree (they are what pooling downstream reads)
        real = mask.astype(bool)
        assert_close(np.asarray(out["last_hidden_state"])[real],
                     (ref.last_hidden_state if kind == "base" else hidden.last_hidden_state).numpy()[real],
                     what="last_hidden_state (real tokens)")


def test_config_read_from_hf(bert_case):
    cfg, hf = bert_case["pretrained"].config, bert_case["torch"].config
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps", "pad_token_id"):
        assert getattr(cfg, name) == getattr(hf, name), name


def test_bert_model_from_mlm_checkpoint(random_mlm_dir, rng):
    """task='base' on a BertForMaskedLM directory: `bert.` prefix stripped, `cls.*` heads dropped."""
    tm, directory = random_mlm_dir
    assert any(k.startswith("cls.") for k in load_file(str(directory / "model.safetensors")))
    pretrained = load_pretrained(directory)
    assert isinstance(pretrained.module, BertModel)
    assert not pretrained.module.add_pooling_layer  # BertForMaskedLM files carry no pooler
    assert pretrained.layout.prefix == "bert."
    assert "cls" not in pretrained.params
    cfg = pretrained.config
    inputs = random_bert_inputs(rng, 3, 11, cfg.vocab_size, cfg.type_vocab_size, padded=True)
    out = run_flax(pretrained, inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
    ref = run_torch(tm.bert, inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
    assert set(out) == {"last_hidden_state"}
    assert_close(out["last_hidden_state"], ref.last_hidden_state, what="last_hidden_state")


def test_mlm_from_checkpoint_without_heads_fails(random_mlm_dir, tmp_path):
    _, directory = random_mlm_dir
    tensors = load_file(str(directory / "model.safetensors"))
    kept = {k: v for k, v in tensors.items() if not k.startswith("cls.")}
    assert len(kept) < len(tensors)
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    save_file(kept, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing.*cls\.predictions\.") as info:
        load_pretrained(tmp_path, task="mlm")
    for key in ("cls.predictions.bias", "cls.predictions.transform.dense.weight",
                "cls.predictions.transform.LayerNorm.weight"):
        assert key in str(info.value)
    # The same directory still loads as a bare encoder.
    assert isinstance(load_pretrained(tmp_path).module, BertModel)


def test_mlm_head_is_tied_to_word_embeddings(random_mlm_dir, rng):
    """The logits are the transformed hidden state times the embedding table plus the bias (numpy)."""
    tm, directory = random_mlm_dir
    pretrained = load_pretrained(directory, task="mlm")
    cfg = pretrained.config
    inputs = random_bert_inputs(rng, 2, 9, cfg.vocab_size, cfg.type_vocab_size, padded=True)
    out = run_flax(pretrained, inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
    with torch.no_grad():
        transformed = tm.cls.predictions.transform(torch.from_numpy(np.array(out["last_hidden_state"]))).numpy()
    table = load_file(str(directory / "model.safetensors"))["bert.embeddings.word_embeddings.weight"]
    bias = load_file(str(directory / "model.safetensors"))["cls.predictions.bias"]
    expected = transformed.astype(np.float64) @ table.T.astype(np.float64) + bias
    assert_close(out["logits"], expected, what="logits vs tied decoder")
