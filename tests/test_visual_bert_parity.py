"""Flax VisualBERT vs transformers' PyTorch VisualBERT classes on random checkpoints (fp32, <= 1e-4),
exact HF -> Flax -> HF round trips, the µ-VLA extra embeddings, input errors, and VisualBERT
initialised from a BERT directory."""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file

from conftest import assert_close, perturb_flax, random_bert_inputs, save_random_model
from vlcore.encoders import (
    BertModel,
    VisualBertConfig,
    VisualBertForPreTraining,
    VisualBertForQuestionAnswering,
    VisualBertForRegionToPhraseAlignment,
    VisualBertForVisualReasoning,
    VisualBertModel,
)
from vlcore.hf_checkpoint import (
    CheckpointError,
    from_flax,
    hf_state_dict,
    init_params,
    load_pretrained,
    save_pretrained,
    visual_bert_from_bert,
)

CONFIGS = {
    "gelu-w32-h4-l2-v12": dict(),
    "gelu_new-w48-h6-l3-v20": dict(
        vocab_size=97, hidden_size=48, num_attention_heads=6, num_hidden_layers=3, intermediate_size=64,
        type_vocab_size=3, max_position_embeddings=24, hidden_act="gelu_new", layer_norm_eps=1e-5,
        visual_embedding_dim=20, num_labels=5,
    ),
    "relu-w24-h2-l1-v7": dict(
        vocab_size=37, hidden_size=24, num_attention_heads=2, num_hidden_layers=1, intermediate_size=100,
        max_position_embeddings=16, hidden_act="relu", pad_token_id=3, visual_embedding_dim=7, num_labels=2,
    ),
}
CLASSES = {
    "base": (transformers.VisualBertModel, VisualBertModel),
    "pretraining": (transformers.VisualBertForPreTraining, VisualBertForPreTraining),
    "vqa": (transformers.VisualBertForQuestionAnswering, VisualBertForQuestionAnswering),
    "nlvr2": (transformers.VisualBertForVisualReasoning, VisualBertForVisualReasoning),
    "region_to_phrase": (transformers.VisualBertForRegionToPhraseAlignment, VisualBertForRegionToPhraseAlignment),
}
HEAD_OUTPUTS = {"base": (), "pretraining": ("prediction_logits", "seq_relationship_logits"), "vqa": ("logits",),
                "nlvr2": ("logits",), "region_to_phrase": ("logits",)}
TEXT_LEN, REGIONS = 9, 6


def small_visual_bert_config(**overrides) -> transformers.VisualBertConfig:
    base = dict(
        vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=20, type_vocab_size=2, hidden_act="gelu", initializer_range=0.2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, visual_embedding_dim=12, num_labels=3,
    )
    base.update(overrides)
    return transformers.VisualBertConfig(**base)


def visual_inputs(rng, cfg, batch: int, masked: bool, task: str) -> dict[str, np.ndarray]:
    """Random text (right-padded when masked), regions (some masked when masked) and, for
    region-to-phrase, phrase positions (-1 included)."""
    text = random_bert_inputs(rng, batch, TEXT_LEN, cfg.vocab_size, cfg.type_vocab_size, padded=masked)
    inputs = dict(text)
    inputs["visual_embeds"] = rng.standard_normal((batch, REGIONS, cfg.visual_embedding_dim)).astype(np.float32)
    vmask = np.ones((batch, REGIONS), np.int32)
    if masked:
        for i in range(batch):
            vmask[i, REGIONS - 1 - i % 3:] = 0
    inputs["visual_attention_mask"] = vmask
    inputs["visual_token_type_ids"] = rng.integers(0, cfg.type_vocab_size, (batch, REGIONS)).astype(np.int32)
    if task == "region_to_phrase":
        inputs["region_to_phrase_position"] = rng.integers(-1, TEXT_LEN + REGIONS, (batch, 4)).astype(np.int32)
    return inputs


def run_flax(pretrained, inputs: dict, **extra):
    kwargs = {k: None if v is None else jnp.asarray(v) for k, v in {**inputs, **extra}.items()}
    return pretrained.module.apply({"params": pretrained.params}, **kwargs)


def run_torch(model, inputs: dict, **extra):
    def as_t(v):
        return v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v, np.float32 if np.asarray(
            v).dtype.kind == "f" else np.int64))
    with torch.no_grad():
        return model(**{k: as_t(v) for k, v in {**inputs, **extra}.items() if v is not None},
                     output_hidden_states=True)


def torch_outputs(task, ref) -> dict[str, torch.Tensor]:
    out = {"last_hidden_state": ref.hidden_states[-1]}
    if task == "base":
        out["pooler_output"] = ref.pooler_output
    for name in HEAD_OUTPUTS[task]:
        out[name] = getattr(ref, name)
    return out


@pytest.fixture(scope="module", params=[(t, c) for t in CLASSES for c in CONFIGS], ids=lambda p: f"{p[0]}-{p[1]}")
def vb_case(request, tmp_path_factory):
    task, name = request.param
    seed = 300 + 10 * list(CLASSES).index(task) + list(CONFIGS).index(name)
    torch_model, directory = save_random_model(
        CLASSES[task][0], small_visual_bert_config(**CONFIGS[name]), tmp_path_factory.mktemp(f"vb-{task}"), seed=seed)
    return dict(task=task, config=name, torch=torch_model, pretrained=load_pretrained(directory), dir=directory,
                seed=seed)


MAX_DIFF: dict[str, float] = {}  # per class, over every case and output (printed by the last test)


@pytest.mark.parametrize("batch,masked", [(1, False), (4, False), (4, True)], ids=["b1", "b4", "b4-masked"])
def test_visual_bert_matches_transformers(vb_case, batch, masked):
    task, pretrained, tm = vb_case["task"], vb_case["pretrained"], vb_case["torch"]
    assert type(pretrained.module) is CLASSES[task][1]  # chosen from config.json's architectures
    cfg = pretrained.config
    rng = np.random.default_rng(vb_case["seed"] + 2 * batch + masked)
    inputs = visual_inputs(rng, cfg, batch, masked, task)
    flax_inputs, torch_inputs = dict(inputs), dict(inputs)
    if not masked:  # Flax defaults: attend everywhere (transformers' QA / region heads need the masks)
        flax_inputs["attention_mask"] = flax_inputs["visual_attention_mask"] = None
        if task not in ("vqa", "region_to_phrase"):
            torch_inputs = dict(flax_inputs)
        if batch == 1:  # and token types 0 for the text, 1 for the regions (transformers' defaults)
            flax_inputs["token_type_ids"] = flax_inputs["visual_token_type_ids"] = None
            torch_inputs["token_type_ids"] = torch_inputs["visual_token_type_ids"] = None
    out = jax.jit(lambda p, kw: pretrained.module.apply({"params": p}, **kw))(
        pretrained.params, {k: jnp.asarray(v) for k, v in flax_inputs.items() if v is not None})
    expected = torch_outputs(task, run_torch(tm, torch_inputs))
    assert set(out) == {"last_hidden_state", "pooler_output", *HEAD_OUTPUTS[task]}
    shapes = {"last_hidden_state": (batch, TEXT_LEN + REGIONS, cfg.hidden_size), "pooler_output": (batch, cfg.hidden_size),
              "prediction_logits": (batch, TEXT_LEN + REGIONS, cfg.vocab_size), "seq_relationship_logits": (batch, 2)}
    shapes["logits"] = {"vqa": (batch, cfg.num_labels), "nlvr2": (batch, cfg.num_labels),
                        "region_to_phrase": (batch, 4, REGIONS)}.get(task)
    for name, want in expected.items():
        assert out[name].shape == shapes[name], name
        diff = assert_close(out[name], want, what=f"{task}/{name}")
        MAX_DIFF[task] = max(MAX_DIFF.get(task, 0.0), diff)
    if task == "region_to_phrase" and masked:  # masked regions score finfo.min, as in transformers
        masked_scores = np.asarray(out["logits"])[np.broadcast_to(inputs["visual_attention_mask"][:, None] == 0,
                                                                  out["logits"].shape)]
        assert masked_scores.size and np.all(masked_scores == np.finfo(np.float32).min)


def test_config_read_from_hf(vb_case):
    cfg, hf = vb_case["pretrained"].config, vb_case["torch"].config
    for name in ("vocab_size", "hidden_size", "visual_embedding_dim", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps",
                 "pad_token_id", "num_labels", "special_visual_initialize"):
        assert getattr(cfg, name) == getattr(hf, name), name


def test_round_trip_is_exact(vb_case, tmp_path):
    """HF -> Flax -> HF gives every tensor back bit for bit, and transformers reads the export."""
    task, pretrained, directory = vb_case["task"], vb_case["pretrained"], vb_case["dir"]
    expected = load_file(str(directory / "model.safetensors"))
    state = hf_state_dict(pretrained)
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and np.array_equal(state[key], value), key
    out = save_pretrained(pretrained, tmp_path / "out")
    saved = load_file(str(out / "model.safetensors"))
    assert sorted(saved) == sorted(expected) and all(np.array_equal(saved[k], v) for k, v in expected.items())
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "visual_bert" and config["architectures"] == [CLASSES[task][0].__name__]
    if vb_case["config"] == next(iter(CONFIGS)):  # once per class: transformers reads the export alike
        reloaded = CLASSES[task][0].from_pretrained(out).eval()
        inputs = visual_inputs(np.random.default_rng(0), pretrained.config, 2, True, task)
        flax_out = run_flax(pretrained, inputs)
        for name, want in torch_outputs(task, run_torch(reloaded, inputs)).items():
            assert_close(flax_out[name], want, what=name)


# ----------------------------------------------------------------------------- extra embeddings


@pytest.fixture(scope="module")
def pretraining_case(tmp_path_factory):
    tm, directory = save_random_model(transformers.VisualBertForPreTraining, small_visual_bert_config(),
                                      tmp_path_factory.mktemp("vb-extra"), seed=41)
    return tm, load_pretrained(directory, task="pretraining")


def test_zero_extra_embeddings_change_nothing(pretraining_case, rng):
    _, pretrained = pretraining_case
    cfg = pretrained.config
    inputs = visual_inputs(rng, cfg, 3, True, "pretraining")
    plain = run_flax(pretrained, inputs)
    zeros = run_flax(pretrained, inputs, text_extra_embeddings=np.zeros((3, TEXT_LEN, cfg.hidden_size), np.float32),
                     visual_extra_embeddings=np.zeros((3, REGIONS, cfg.hidden_size), np.float32))
    for name in plain:
        np.testing.assert_array_equal(np.asarray(zeros[name]), np.asarray(plain[name]), err_msg=name)


def test_extra_embeddings_equal_transformers_with_the_same_additions(pretraining_case, rng):
    """Text: transformers' `inputs_embeds` = word embeddings + extra. Regions: transformers has no
    such input, so a forward hook adds the extra to the output of its `visual_projection`
    (the sum before the LayerNorm is the same)."""
    tm, pretrained = pretraining_case
    cfg = pretrained.config
    inputs = visual_inputs(rng, cfg, 3, True, "pretraining")
    text_extra = rng.standard_normal((3, TEXT_LEN, cfg.hidden_size)).astype(np.float32)
    visual_extra = rng.standard_normal((3, REGIONS, cfg.hidden_size)).astype(np.float32)
    out = run_flax(pretrained, inputs, text_extra_embeddings=text_extra, visual_extra_embeddings=visual_extra)

    embeddings = tm.visual_bert.embeddings
    with torch.no_grad():
        inputs_embeds = embeddings.word_embeddings(torch.from_numpy(inputs["input_ids"].astype(np.int64)))
    hook = embeddings.visual_projection.register_forward_hook(lambda m, a, y: y + torch.from_numpy(visual_extra))
    try:
        torch_inputs = {k: v for k, v in inputs.items() if k != "input_ids"}
        ref = run_torch(tm, torch_inputs, inputs_embeds=inputs_embeds + torch.from_numpy(text_extra))
    finally:
        hook.remove()
    plain = run_flax(pretrained, inputs)
    assert float(np.abs(np.asarray(plain["last_hidden_state"]) - ref.hidden_states[-1].numpy()).max()) > 1e-2
    for name, want in torch_outputs("pretraining", ref).items():
        assert_close(out[name], want, what=name)


def test_bfloat16_compute_runs_close(pretraining_case, rng):
    _, pretrained = pretraining_case
    bf16 = load_pretrained(pretrained.path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(bf16.params))
    inputs = visual_inputs(rng, pretrained.config, 2, True, "pretraining")
    a, b = run_flax(pretrained, inputs), run_flax(bf16, inputs)
    assert b["last_hidden_state"].dtype == jnp.bfloat16
    assert_close(b["last_hidden_state"], a["last_hidden_state"], atol=0.1, what="bf16 last_hidden_state")


# ----------------------------------------------------------------------------- errors


def test_region_width_error_names_both_sizes(pretraining_case, rng):
    _, pretrained = pretraining_case
    inputs = visual_inputs(rng, pretrained.config, 2, False, "pretraining")
    for width in (14, 10):
        bad = dict(inputs, visual_embeds=np.zeros((2, REGIONS, width), np.float32))
        with pytest.raises(ValueError, match=rf"visual_embeds: last dimension {width} != visual_embedding_dim 12"):
            run_flax(pretrained, bad)


@pytest.mark.parametrize("change,message", [
    (dict(visual_attention_mask=np.ones((2, REGIONS + 1), np.int32)), r"visual_attention_mask: expected shape"),
    (dict(visual_token_type_ids=np.ones((2, 2), np.int32)), r"visual_token_type_ids: expected shape"),
    (dict(attention_mask=np.ones((2, 3), np.int32)), r"attention_mask: expected shape"),
    (dict(visual_embeds=np.zeros((3, REGIONS, 12), np.float32)), r"visual_embeds: batch 3 != input_ids batch 2"),
    (dict(visual_embeds=np.zeros((REGIONS, 12), np.float32)), r"visual_embeds: expected shape \[batch, regions"),
    (dict(text_extra_embeddings=np.zeros((2, TEXT_LEN, 31), np.float32)), r"text_extra_embeddings: expected shape"),
    (dict(visual_extra_embeddings=np.zeros((2, 1, 32), np.float32)), r"visual_extra_embeddings: expected shape"),
    (dict(visual_embeds=None), r"visual_attention_mask given without visual_embeds"),
    (dict(input_ids=np.ones((2, 21), np.int32), attention_mask=None, token_type_ids=None),
     r"sequence length 21 exceeds max_position_embeddings 20"),
])
def test_bad_inputs_are_clear_errors(pretraining_case, rng, change, message):
    _, pretrained = pretraining_case
    inputs = dict(visual_inputs(rng, pretrained.config, 2, False, "pretraining"), **change)
    with pytest.raises(ValueError, match=message):
        run_flax(pretrained, inputs)


def test_region_to_phrase_needs_positions(tmp_path, rng):
    _, directory = save_random_model(transformers.VisualBertForRegionToPhraseAlignment, small_visual_bert_config(),
                                     tmp_path, seed=5)
    pretrained = load_pretrained(directory)
    inputs = visual_inputs(rng, pretrained.config, 2, False, "pretraining")
    with pytest.raises(ValueError, match="region_to_phrase_position"):
        run_flax(pretrained, inputs)


def test_unsupported_configs_and_tasks(pretraining_case, random_bert_dir, tmp_path):
    _, pretrained = pretraining_case
    d = tmp_path / "bypass"
    d.mkdir()
    (d / "model.safetensors").write_bytes((pretrained.path / "model.safetensors").read_bytes())
    config = json.loads((pretrained.path / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(config, bypass_transformer=True)))
    with pytest.raises(CheckpointError, match="bypass_transformer=True is not supported"):
        load_pretrained(d)
    with pytest.raises(CheckpointError, match=r"task 'mlm' does not apply to VisualBERT.*'pretraining'"):
        load_pretrained(pretrained.path, task="mlm")
    with pytest.raises(CheckpointError, match="task 'vqa' does not apply to BERT"):
        load_pretrained(random_bert_dir[1], task="vqa")


# ----------------------------------------------------------------------------- other layouts


def test_base_task_on_a_head_checkpoint_drops_the_heads(pretraining_case, rng, tmp_path):
    tm, pretrained = pretraining_case
    base = load_pretrained(pretrained.path, task="base")
    assert isinstance(base.module, VisualBertModel) and base.layout.prefix == "visual_bert."
    inputs = visual_inputs(rng, base.config, 2, True, "base")
    ref = tm.visual_bert(**{k: torch.from_numpy(v.astype(np.float32 if v.dtype.kind == "f" else np.int64))
                            for k, v in inputs.items()})
    assert_close(run_flax(base, inputs)["last_hidden_state"], ref.last_hidden_state.detach(), what="last_hidden_state")
    saved = load_file(str(save_pretrained(base, tmp_path / "out") / "model.safetensors"))
    source = load_file(str(pretrained.path / "model.safetensors"))
    assert sorted(saved) == sorted(k for k in source if k.startswith("visual_bert."))


@pytest.mark.parametrize("task,head", [("vqa", "cls"), ("region_to_phrase", "attention")])
def test_head_of_another_class_is_initialised_with_one_warning(pretraining_case, task, head, caplog):
    """A VisualBertForPreTraining file loaded for VQA (the usual fine-tuning start): the encoder
    is read, the VQA classifier initialised (as transformers does), the pre-training heads dropped."""
    _, pretrained = pretraining_case
    with caplog.at_level(logging.INFO, logger="vlcore.hf_checkpoint"):
        loaded = load_pretrained(pretrained.path, task=task, num_labels=7 if task == "vqa" else None)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"{head}.*" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    for path, value in flatten_dict(pretrained.params["visual_bert"]).items():
        np.testing.assert_array_equal(np.asarray(flatten_dict(loaded.params["visual_bert"])[path]), np.asarray(value))
    if task == "vqa":
        assert loaded.params["cls"]["kernel"].shape == (32, 7) and loaded.hf_config.num_labels == 7
    assert loaded.hf_config.architectures == [CLASSES[task][0].__name__]


def test_flax_built_visual_bert_exports_to_transformers(tmp_path, rng):
    config = VisualBertConfig(vocab_size=43, hidden_size=24, visual_embedding_dim=9, intermediate_size=40,
                              num_hidden_layers=2, num_attention_heads=3, max_position_embeddings=20, num_labels=4,
                              hidden_act="gelu_new")
    module = VisualBertForQuestionAnswering(config)
    params = perturb_flax(init_params(module, seed=3), seed=4)
    out = save_pretrained(from_flax(module, params), tmp_path / "out")
    reloaded = transformers.VisualBertForQuestionAnswering.from_pretrained(out).eval()
    inputs = visual_inputs(rng, config, 3, True, "vqa")
    flax_out = module.apply({"params": params}, **{k: jnp.asarray(v) for k, v in inputs.items()})
    assert_close(flax_out["logits"], run_torch(reloaded, inputs).logits, what="logits")


# ----------------------------------------------------------------------------- from a BERT


def text_only(rng, cfg, batch=3):
    return random_bert_inputs(rng, batch, 11, cfg.vocab_size, cfg.type_vocab_size, padded=True)


def test_from_bert_text_only_equals_the_bert(random_bert_dir, rng, caplog):
    tm, directory = random_bert_dir
    with caplog.at_level(logging.WARNING, logger="vlcore.hf_checkpoint"):
        vb = visual_bert_from_bert(directory, visual_embedding_dim=10, task="base")
    assert isinstance(vb.module, VisualBertModel) and vb.config.visual_embedding_dim == 10
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "visual_projection" in warning and "encoder" not in warning.split("freshly initialised")[1]
    inputs = text_only(rng, vb.config)
    out = run_flax(vb, inputs)
    ref = tm(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items()})
    assert_close(out["last_hidden_state"], ref.last_hidden_state.detach(), what="last_hidden_state")
    assert_close(out["pooler_output"], ref.pooler_output.detach(), what="pooler_output")
    bert = load_pretrained(directory)
    assert isinstance(bert.module, BertModel)
    np.testing.assert_allclose(np.asarray(out["last_hidden_state"]),
                               np.asarray(run_flax(bert, inputs)["last_hidden_state"]), atol=1e-6)
    emb = vb.params["embeddings"]  # special_visual_initialize: the visual tables start as the text ones
    np.testing.assert_array_equal(emb["visual_token_type_embeddings"]["embedding"],
                                  emb["token_type_embeddings"]["embedding"])
    np.testing.assert_array_equal(emb["visual_position_embeddings"]["embedding"],
                                  emb["position_embeddings"]["embedding"])


def test_from_mlm_bert_copies_the_mlm_head_and_exports(random_mlm_dir, rng, tmp_path):
    """BertForMaskedLM -> VisualBertForPreTraining: text-only MLM logits equal the BERT's; regions
    then work, and transformers reads the export."""
    tm, directory = random_mlm_dir
    vb = visual_bert_from_bert(directory, 12, task="pretraining")
    inputs = text_only(rng, vb.config)
    out = run_flax(vb, inputs)
    ref = tm(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items()}, output_hidden_states=True)
    assert_close(out["last_hidden_state"], ref.hidden_states[-1].detach(), what="last_hidden_state")
    assert_close(out["prediction_logits"], ref.logits.detach(), what="prediction_logits")
    reloaded = transformers.VisualBertForPreTraining.from_pretrained(save_pretrained(vb, tmp_path / "out")).eval()
    with_regions = visual_inputs(rng, vb.config, 2, True, "pretraining")
    flax_out = run_flax(vb, with_regions)
    for name, want in torch_outputs("pretraining", run_torch(reloaded, with_regions)).items():
        assert_close(flax_out[name], want, what=name)


def test_from_bert_that_does_not_fit_is_a_clear_error(random_bert_dir, random_clip_dir):
    _, directory = random_bert_dir
    bert = load_pretrained(directory).config
    for change, message in ((dict(vocab_size=97), r"vocab_size 61 != 97"), (dict(hidden_size=48), r"hidden_size 32 != 48")):
        config = VisualBertConfig.from_bert(bert, 12, **change)
        with pytest.raises(CheckpointError, match=rf"does not fit the requested VisualBertConfig.*{message}"):
            visual_bert_from_bert(directory, config=config)
    with pytest.raises(CheckpointError, match="model_type 'clip'"):
        visual_bert_from_bert(random_clip_dir[1], 12)


def test_from_a_visual_bert_dir_is_that_checkpoint(pretraining_case):
    """A VisualBERT directory is read as it is (for the task asked), if it fits the request."""
    _, pretrained = pretraining_case
    same = visual_bert_from_bert(pretrained.path, 12, task="pretraining")
    assert isinstance(same.module, VisualBertForPreTraining)
    for path, value in flatten_dict(pretrained.params).items():
        np.testing.assert_array_equal(np.asarray(flatten_dict(same.params)[path]), np.asarray(value))
    with pytest.raises(CheckpointError, match="visual_embedding_dim 12 != 13"):
        visual_bert_from_bert(pretrained.path, 13, task="pretraining")


def test_report_max_diff_per_class():
    """Not a check: prints the largest parity difference each class reached above (pytest -s)."""
    print("\nmax abs diff per class:", {k: f"{v:.2e}" for k, v in MAX_DIFF.items()})
