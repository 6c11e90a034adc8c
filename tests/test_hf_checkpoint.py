"""HF checkpoint import/export: exact round trips, transformers-loadable exports, clear errors."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

from conftest import assert_close, perturb_flax, random_bert_inputs
from vlcore.encoders import BertConfig, BertForMaskedLM, BertModel, CLIPConfig, CLIPModel
from vlcore.encoders.configs import CLIPTextConfig, CLIPVisionConfig
from vlcore.hf_checkpoint import (
    CheckpointError,
    from_flax,
    hf_state_dict,
    init_params,
    load_pretrained,
    load_tokenizer,
    save_pretrained,
)
from vlcore.sentence_encoder import bundled_minilm_path

# np.ascontiguousarray (vlcore/hf_checkpoint.py, hf_state_dict) turns the 0-d `logit_scale` into shape (1,).


# ----------------------------------------------------------------------------- helpers


def weights(directory: Path) -> dict[str, np.ndarray]:
    return load_file(str(Path(directory) / "model.safetensors"))


def assert_same_tensors(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Same key set, and every tensor with the same dtype, shape and bits."""
    assert sorted(actual) == sorted(expected), (
        f"missing {sorted(set(expected) - set(actual))}, extra {sorted(set(actual) - set(expected))}"
    )
    for key in expected:
        a, e = np.asarray(actual[key]), expected[key]
        assert a.dtype == e.dtype, f"{key}: dtype {a.dtype} != {e.dtype}"
        assert a.shape == e.shape, f"{key}: shape {a.shape} != {e.shape}"
        assert np.array_equal(a, e), f"{key}: values differ"


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(src / name, dst / name)
    return dst


def flax_bert_outputs(pretrained, inputs):
    fn = jax.jit(lambda p, *a: pretrained.module.apply({"params": p}, *a))
    return fn(pretrained.params, *(jnp.asarray(inputs[k]) for k in ("input_ids", "attention_mask", "token_type_ids")))


def torch_bert_outputs(model, inputs):
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items()})


def clip_inputs(config: CLIPConfig, rng: np.random.Generator, n_images: int = 2, n_texts: int = 3):
    v, t = config.vision, config.text
    images = rng.standard_normal((n_images, v.image_size, v.image_size, v.num_channels)).astype(np.float32)
    seq = min(t.max_position_embeddings, 9)
    ids = rng.integers(3, min(t.eos_token_id, t.vocab_size - 1), size=(n_texts, seq))
    mask = np.ones((n_texts, seq), np.int64)
    for i in range(n_texts):
        length = seq - i
        ids[i, length - 1] = t.eos_token_id
        ids[i, length:] = 0
        mask[i, length:] = 0
    return images, ids, mask


def compare_clip(pretrained, torch_model, rng):
    images, ids, mask = clip_inputs(pretrained.config, rng)
    out = jax.jit(lambda p, *a: pretrained.module.apply({"params": p}, *a))(
        pretrained.params, jnp.asarray(images), jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    with torch.no_grad():
        ref = torch_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                          input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    for name in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
        assert_close(out[name], getattr(ref, name), what=name)


# ----------------------------------------------------------------------------- round trips


@pytest.fixture(scope="module")
def source_dirs(random_clip_dir, random_bert_dir, random_mlm_dir):
    return {
        "clip": (random_clip_dir[1], "base"),
        "bert": (random_bert_dir[1], "base"),
        "mlm": (random_mlm_dir[1], "mlm"),
        "minilm": (bundled_minilm_path(), "base"),
    }


@pytest.mark.parametrize("source", [
    "clip", "bert", "mlm", "minilm",
])
def test_round_trip_is_exact(source_dirs, source, tmp_path):
    """HF -> Flax -> HF gives back every tensor bit for bit, in memory and through save_pretrained."""
    directory, task = source_dirs[source]
    expected = weights(directory)
    pretrained = load_pretrained(directory, task=task)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(pretrained.params))
    assert_same_tensors(hf_state_dict(pretrained), expected)
    out = save_pretrained(pretrained, tmp_path / "out")
    assert_same_tensors(weights(out), expected)
    assert json.loads((out / "config.json").read_text())["model_type"] == pretrained.hf_config.model_type


def test_minilm_round_trip_keeps_position_ids_buffer():
    pretrained = load_pretrained(bundled_minilm_path())
    state = hf_state_dict(pretrained)
    assert state["embeddings.position_ids"].dtype == np.int64
    np.testing.assert_array_equal(state["embeddings.position_ids"], np.arange(512)[None])


def test_float16_checkpoint_round_trips_in_float16(random_bert_dir, rng, tmp_path):
    torch_model, directory = random_bert_dir
    half = {k: v.astype(np.float16) if np.issubdtype(v.dtype, np.floating) else v for k, v in weights(directory).items()}
    src = tmp_path / "fp16"
    src.mkdir()
    shutil.copyfile(directory / "config.json", src / "config.json")
    save_file(half, str(src / "model.safetensors"), metadata={"format": "pt"})

    pretrained = load_pretrained(src)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(pretrained.params))
    state = hf_state_dict(pretrained)
    assert all(v.dtype == np.float16 for v in state.values())
    assert_same_tensors(state, half)
    assert_same_tensors(weights(save_pretrained(pretrained, tmp_path / "out")), half)

    # The fp16 weights, computed in fp32, match the PyTorch model with the same fp16-rounded weights.
    torch_model = transformers.BertModel.from_pretrained(src, dtype=torch.float32).eval()
    inputs = random_bert_inputs(rng, 2, 10, pretrained.config.vocab_size, pretrained.config.type_vocab_size, True)
    out, ref = flax_bert_outputs(pretrained, inputs), torch_bert_outputs(torch_model, inputs)
    assert_close(out["last_hidden_state"], ref.last_hidden_state, what="last_hidden_state")


def test_saved_minilm_keeps_tokenizer(tmp_path):
    source = bundled_minilm_path()
    out = save_pretrained(load_pretrained(source), tmp_path / "minilm")
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    text = ["Exported checkpoints keep their tokenizer, café naïve."]
    assert load_tokenizer(out)(text)["input_ids"] == load_tokenizer(source)(text)["input_ids"]


def test_old_mlm_checkpoint_with_stored_decoder_copies(random_mlm_dir, rng, tmp_path):
    """Older BertForMaskedLM files also store the tied decoder tensors; they load and are written back."""
    torch_model, directory = random_mlm_dir
    tensors = weights(directory)
    tensors["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"].copy()
    tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"].copy()
    src = copy_checkpoint(directory, tmp_path / "old")
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    pretrained = load_pretrained(src, task="mlm")
    assert_same_tensors(hf_state_dict(pretrained), tensors)
    inputs = random_bert_inputs(rng, 2, 8, pretrained.config.vocab_size, pretrained.config.type_vocab_size, True)
    assert_close(flax_bert_outputs(pretrained, inputs)["logits"], torch_bert_outputs(torch_model, inputs).logits,
                 what="logits")

    # An untied decoder is refused rather than silently replaced by the embedding table.
    tensors["cls.predictions.decoder.weight"] = tensors["cls.predictions.decoder.weight"] + 1
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"cls\.predictions\.decoder\.weight differs"):
        load_pretrained(src, task="mlm")


def test_bert_model_from_old_mlm_checkpoint_exports(random_mlm_dir, tmp_path):
    _, directory = random_mlm_dir
    tensors = weights(directory)
    tensors["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"].copy()
    tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"].copy()
    src = copy_checkpoint(directory, tmp_path / "old")
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    pretrained = load_pretrained(src)  # a bare BertModel: the cls.* heads are dropped
    out = save_pretrained(pretrained, tmp_path / "out")
    encoder = {k: v for k, v in tensors.items() if k.startswith("bert.")}
    assert {k: v for k, v in weights(out).items() if k.startswith("bert.")}.keys() == encoder.keys()
    reloaded = load_pretrained(out)
    for (path, a), b in zip(sorted(flatten_dict(reloaded.params).items()),
                            [v for _, v in sorted(flatten_dict(pretrained.params).items())]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


# ----------------------------------------------------------------------------- exports load in transformers


def test_saved_clip_loads_in_transformers(random_clip_dir, rng, tmp_path):
    _, directory = random_clip_dir
    pretrained = load_pretrained(directory)
    out = save_pretrained(pretrained, tmp_path / "out")
    compare_clip(pretrained, transformers.CLIPModel.from_pretrained(out).eval(), rng)


@pytest.mark.parametrize("kind", ["base", "mlm"])
def test_saved_bert_loads_in_transformers(kind, random_bert_dir, random_mlm_dir, rng, tmp_path):
    torch_cls = {"base": transformers.BertModel, "mlm": transformers.BertForMaskedLM}[kind]
    _, directory = {"base": random_bert_dir, "mlm": random_mlm_dir}[kind]
    pretrained = load_pretrained(directory, task=kind)
    out = save_pretrained(pretrained, tmp_path / "out")
    reloaded = torch_cls.from_pretrained(out).eval()
    cfg = pretrained.config
    inputs = random_bert_inputs(rng, 3, 12, cfg.vocab_size, cfg.type_vocab_size, padded=True)
    flax_out, ref = flax_bert_outputs(pretrained, inputs), torch_bert_outputs(reloaded, inputs)
    if kind == "base":
        assert_close(flax_out["last_hidden_state"], ref.last_hidden_state, what="last_hidden_state")
        assert_close(flax_out["pooler_output"], ref.pooler_output, what="pooler_output")
    else:
        assert_close(flax_out["logits"], ref.logits, what="logits")


@pytest.mark.parametrize("kind", ["base", "mlm"])
def test_bert_built_in_flax_exports_to_transformers(kind, rng, tmp_path):
    """Flax init (perturbed) -> from_flax -> save_pretrained -> transformers: checks export without import."""
    config = BertConfig(vocab_size=43, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                        num_attention_heads=3, max_position_embeddings=20, type_vocab_size=3, hidden_act="gelu_new")
    module = BertModel(config) if kind == "base" else BertForMaskedLM(config)
    params = perturb_flax(init_params(module, seed=3), seed=4)
    out = save_pretrained(from_flax(module, params), tmp_path / "out")
    torch_cls = {"base": transformers.BertModel, "mlm": transformers.BertForMaskedLM}[kind]
    assert json.loads((out / "config.json").read_text())["architectures"] == [torch_cls.__name__]
    reloaded = torch_cls.from_pretrained(out).eval()
    inputs = random_bert_inputs(rng, 2, 11, config.vocab_size, config.type_vocab_size, padded=True)
    flax_out = jax.jit(lambda p, *a: module.apply({"params": p}, *a))(
        params, *(jnp.asarray(inputs[k]) for k in ("input_ids", "attention_mask", "token_type_ids")))
    ref = torch_bert_outputs(reloaded, inputs)
    if kind == "base":
        assert_close(flax_out["last_hidden_state"], ref.last_hidden_state, what="last_hidden_state")
        assert_close(flax_out["pooler_output"], ref.pooler_output, what="pooler_output")
    else:
        assert_close(flax_out["logits"], ref.logits, what="logits")


def test_clip_built_in_flax_exports_to_transformers(rng, tmp_path):
    config = CLIPConfig(
        CLIPTextConfig(vocab_size=45, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=12, hidden_act="gelu", eos_token_id=44),
        CLIPVisionConfig(image_size=24, patch_size=8, hidden_size=24, intermediate_size=36, num_hidden_layers=2,
                         num_attention_heads=2, hidden_act="quick_gelu"),
        projection_dim=16,
    )
    module = CLIPModel(config)
    params = perturb_flax(init_params(module, seed=5), seed=6)
    out = save_pretrained(from_flax(module, params), tmp_path / "out")
    reloaded = transformers.CLIPModel.from_pretrained(out).eval()
    compare_clip(from_flax(module, params), reloaded, rng)


# ----------------------------------------------------------------------------- bad input


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_pretrained(tmp_path / "does-not-exist")


def test_file_instead_of_directory(random_bert_dir):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_pretrained(random_bert_dir[1] / "model.safetensors")


def test_directory_without_config(random_bert_dir, tmp_path):
    shutil.copyfile(random_bert_dir[1] / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path)


def test_invalid_json_config(random_bert_dir, tmp_path):
    d = copy_checkpoint(random_bert_dir[1], tmp_path / "ckpt")
    (d / "config.json").write_text('{"model_type": "bert", "hidden_size": ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pretrained(d)


def test_unsupported_model_type(random_bert_dir, tmp_path):
    d = copy_checkpoint(random_bert_dir[1], tmp_path / "ckpt")
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4).save_pretrained(d)
    with pytest.raises(CheckpointError, match=r"model_type 'gpt2' is not supported"):
        load_pretrained(d)


def test_unsupported_activation(random_bert_dir, tmp_path):
    d = copy_checkpoint(random_bert_dir[1], tmp_path / "ckpt")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(config, hidden_act="silu")))
    with pytest.raises(CheckpointError, match=r"hidden_act 'silu' is not supported"):
        load_pretrained(d)


def test_mlm_task_on_clip(random_clip_dir):
    with pytest.raises(CheckpointError, match="task 'mlm' does not apply to CLIP"):
        load_pretrained(random_clip_dir[1], task="mlm")


def test_no_weights_file(random_bert_dir, tmp_path):
    shutil.copyfile(random_bert_dir[1] / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors") as info:
        load_pretrained(tmp_path)
    assert "pytorch_model.bin" not in str(info.value)
    torch.save(random_bert_dir[0].state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no model.safetensors.*found pytorch_model\.bin"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_weights_file(damage, random_bert_dir, tmp_path):
    d = copy_checkpoint(random_bert_dir[1], tmp_path / "ckpt")
    data = (d / "model.safetensors").read_bytes()
    new = {"truncated": data[: len(data) // 2], "garbage": b"\x00not a safetensors file" * 10, "empty": b""}[damage]
    (d / "model.safetensors").write_bytes(new)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_pretrained(d)


def resave(d: Path, tensors: dict[str, np.ndarray]) -> None:
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_listed(random_bert_dir, tmp_path):
    d = copy_checkpoint(random_bert_dir[1], tmp_path / "ckpt")
    tensors = weights(d)
    del tensors["encoder.layer.1.attention.self.key.bias"]
    resave(d, tensors)
    with pytest.raises(CheckpointError, match=r"missing \(1\): encoder\.layer\.1\.attention\.self\.key\.bias \(32,\)"):
        load_pretrained(d)


def test_unexpected_tensor_is_listed(random_bert_dir, tmp_path):
    d = copy_checkpoint(random_bert_dir[1], tmp_path / "ckpt")
    tensors = weights(d)
    tensors["encoder.layer.0.adapter.weight"] = np.zeros((4, 32), np.float32)
    resave(d, tensors)
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): encoder\.layer\.0\.adapter\.weight \(4, 32\)"):
        load_pretrained(d)


def test_misshaped_tensor_is_listed_with_both_shapes(random_bert_dir, tmp_path):
    d = copy_checkpoint(random_bert_dir[1], tmp_path / "ckpt")
    tensors = weights(d)
    tensors["encoder.layer.0.intermediate.dense.weight"] = np.zeros((48, 31), np.float32)
    resave(d, tensors)
    with pytest.raises(CheckpointError, match=(
            r"mis-shaped \(1\): encoder\.layer\.0\.intermediate\.dense\.weight: checkpoint \(48, 31\), model \(48, 32\)")):
        load_pretrained(d)


def test_several_problems_in_one_error(random_bert_dir, tmp_path):
    d = copy_checkpoint(random_bert_dir[1], tmp_path / "ckpt")
    tensors = weights(d)
    del tensors["pooler.dense.bias"], tensors["embeddings.LayerNorm.weight"]
    tensors["extra.thing"] = np.ones(3, np.float32)
    tensors["embeddings.word_embeddings.weight"] = np.zeros((60, 32), np.float32)
    resave(d, tensors)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(d)
    message = str(info.value)
    for part in ("missing (2)", "pooler.dense.bias (32,)", "embeddings.LayerNorm.weight (32,)",
                 "unexpected (1)", "extra.thing (3,)",
                 "mis-shaped (1)", "embeddings.word_embeddings.weight: checkpoint (60, 32), model (61, 32)"):
        assert part in message, f"{part!r} not in {message!r}"


def test_clip_wrong_image_size(random_clip_dir):
    pretrained = load_pretrained(random_clip_dir[1])
    images = jnp.zeros((1, 24, 24, 3))  # the checkpoint wants 32 x 32
    with pytest.raises(ValueError, match=r"images: expected shape \[batch, 32, 32, 3\]"):
        pretrained.module.apply({"params": pretrained.params}, images, method=CLIPModel.get_image_features)
    with pytest.raises(ValueError, match="images: expected shape"):  # NCHW instead of NHWC
        pretrained.module.apply({"params": pretrained.params}, jnp.zeros((1, 3, 32, 32)),
                                method=CLIPModel.get_image_features)


def test_sequence_longer_than_positions(random_clip_dir, random_bert_dir):
    clip = load_pretrained(random_clip_dir[1])
    too_long = jnp.ones((1, clip.config.text.max_position_embeddings + 1), jnp.int32)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        clip.module.apply({"params": clip.params}, too_long, method=CLIPModel.get_text_features)
    bert = load_pretrained(random_bert_dir[1])
    too_long = jnp.ones((2, bert.config.max_position_embeddings + 1), jnp.int32)
    with pytest.raises(ValueError, match="sequence length 25 exceeds max_position_embeddings 24"):
        bert.module.apply({"params": bert.params}, too_long)


def test_load_tokenizer_without_tokenizer_files(tmp_path):
    with pytest.raises(CheckpointError):
        load_tokenizer(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_tokenizer(empty)


def test_load_tokenizer_on_model_dir_without_tokenizer_files(random_bert_dir):
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_tokenizer(random_bert_dir[1])


# ----------------------------------------------------------------------------- bare encoders for heads, error summaries


def test_bare_minilm_loads_for_mlm_with_one_warning(caplog, rng, tmp_path):
    """A sentence-transformers BertModel (no `bert.` prefix, no `cls.*`) read as BertForMaskedLM,
    as transformers reads it: the encoder (and pooler) mapped, the MLM head initialised."""
    source = bundled_minilm_path()
    with caplog.at_level(logging.INFO, logger="vlcore.hf_checkpoint"):
        mlm = load_pretrained(source, task="mlm")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "cls.predictions" in warnings[0] and "BertForMaskedLM" in warnings[0]
    assert isinstance(mlm.module, BertForMaskedLM) and mlm.module.add_pooling_layer
    base = flatten_dict(load_pretrained(source).params)
    assert flatten_dict(mlm.params["bert"]).keys() == base.keys()
    for path, value in flatten_dict(mlm.params["bert"]).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(base[path]), err_msg=str(path))
    head = flatten_dict(mlm.params["cls"])
    assert sorted("/".join(p) for p in head) == [
        "predictions/bias", "predictions/transform/LayerNorm/bias", "predictions/transform/LayerNorm/scale",
        "predictions/transform/dense/bias", "predictions/transform/dense/kernel"]
    assert not np.any(head["predictions", "bias"]) and np.all(head["predictions", "transform", "LayerNorm", "scale"] == 1)
    assert np.std(head["predictions", "transform", "dense", "kernel"]) > 0  # the Flax initialiser ran

    # Written back as a BertForMaskedLM directory that transformers (and this loader) read as such.
    out = save_pretrained(mlm, tmp_path / "mlm")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    assert all(k.startswith(("bert.", "cls.")) for k in weights(out))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlcore.hf_checkpoint"):
        again = load_pretrained(out, task="mlm")
    assert not caplog.records
    assert_same_tensors(hf_state_dict(again), weights(out))
    reloaded = transformers.BertForMaskedLM.from_pretrained(out).eval()
    inputs = random_bert_inputs(rng, 2, 8, mlm.config.vocab_size, mlm.config.type_vocab_size, padded=True)
    assert_close(flax_bert_outputs(mlm, inputs)["logits"], torch_bert_outputs(reloaded, inputs).logits, what="logits")


def minilm_weights_with_config(config_dir: Path, dst: Path) -> Path:
    """The bundled MiniLM's weights (6 layers, width 384) under another model's config.json."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundled_minilm_path() / "model.safetensors", dst / "model.safetensors")
    shutil.copyfile(config_dir / "config.json", dst / "config.json")
    return dst


@pytest.mark.parametrize("task", ["base", "mlm"])
def test_mismatched_checkpoint_error_is_a_short_summary(random_bert_dir, tmp_path, task):
    d = minilm_weights_with_config(random_bert_dir[1], tmp_path / "ckpt")  # config: width 32, 2 layers
    with pytest.raises(CheckpointError) as info:
        load_pretrained(d, task=task)
    message = str(info.value)
    lines = message.splitlines()
    assert len(lines) <= 8 and all(len(line) < 400 for line in lines), message
    assert re.search(r"mis-shaped \(\d+\): ", message) and re.search(r"unexpected \(\d+\): .*, \.\.\. and \d+ more", message)
    assert "likely cause: the checkpoint's hidden_size 384 differs from config.json's 32" in message


def test_error_summary_names_the_cause(random_bert_dir, random_clip_dir, tmp_path):
    # Right width, wrong depth.
    d = copy_checkpoint(random_bert_dir[1], tmp_path / "deeper")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=3)))
    with pytest.raises(CheckpointError, match=r"missing \(16\): encoder\.layer\.2\.(.|\n)*likely cause: the "
                       r"checkpoint has 2 encoder layers, config.json's num_hidden_layers says 3"):
        load_pretrained(d)
    # Another model's weights altogether.
    d = copy_checkpoint(random_bert_dir[1], tmp_path / "clip-weights")
    shutil.copyfile(random_clip_dir[1] / "model.safetensors", d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"likely cause: none of the checkpoint's \d+ tensors has a name "
                       r"BertModel expects") as info:
        load_pretrained(d)
    assert len(str(info.value).splitlines()) <= 8


def test_head_model_file_without_its_head_is_refused_with_the_cause(random_mlm_dir, tmp_path):
    """config.json says BertForMaskedLM but the file lacks cls.*: incomplete, not a bare encoder."""
    _, directory = random_mlm_dir
    d = copy_checkpoint(directory, tmp_path / "no-head")
    resave(d, {k: v for k, v in weights(d).items() if not k.startswith("cls.")})
    with pytest.raises(CheckpointError, match=r"likely cause: the checkpoint declares BertForMaskedLM but lacks "
                       r"the cls\.predictions head"):
        load_pretrained(d, task="mlm")
