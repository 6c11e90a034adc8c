"""Exporting a pre-trained µ-VLA work dir to transformers: the PyTorch VisualBertForPreTraining
loaded from the export computes what the Flax model computes (without the box embedding, which
transformers' model lacks and the export keeps beside it), with a tokenizer whose ids are the
model's (a restricted vocabulary included); bad work dirs are refused with nothing written."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax.training import train_state
import optax

from jaxmuvla.export import EXTRAS_NAME, ExportError, export
from jaxmuvla.model import MuVLA, init_muvla
from jaxmuvla.vocabulary import Vocabulary, text_ids
from vlcore.encoders.configs import VisualBertConfig
from vlcore.training.checkpointing import Checkpointer

TEXTS = ["a red dotted fish beside a blue car", "two kites above the boat", "[MASK] flower"]


@dataclasses.dataclass
class FakeTask:
    """What `export` reads of a PretrainTask."""

    module: MuVLA
    vocabulary: Vocabulary | None
    config: ml_collections.ConfigDict

    def fingerprint(self):
        return {"model": "muvla", "network": self.module.describe()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A work dir holding a µ-VLA (random weights, restricted vocabulary, box embedding on) as the
    training loop saves it."""
    from vlcore.hf_checkpoint import load_tokenizer
    from vlcore.sentence_encoder import bundled_minilm_path

    tokenizer = load_tokenizer(bundled_minilm_path())
    vocabulary = Vocabulary.from_ids(tokenizer, [text_ids(tokenizer, TEXTS)])
    config = VisualBertConfig(vocab_size=vocabulary.size, hidden_size=32, visual_embedding_dim=12,
                              intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0)
    module = MuVLA(config, num_classes=5)
    params = jax.tree.map(np.asarray, init_muvla(module, seed=3))
    task = FakeTask(module, vocabulary, ml_collections.ConfigDict({"model": {"init": ""}}))
    workdir = tmp_path_factory.mktemp("muvla_run")
    (workdir / "model.json").write_text(json.dumps(task.fingerprint(), sort_keys=True))
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adamw(1e-3))
    checkpointer = Checkpointer(workdir / "checkpoints", 1, 1, async_save=False)
    checkpointer.save(7, state, force=True)
    checkpointer.close()
    out = tmp_path_factory.mktemp("export") / "hf"
    summary = export(task, workdir, out)
    return task, params, tokenizer, workdir, out, summary


def test_transformers_loads_the_export_and_computes_the_flax_model(trained):
    import torch
    import transformers

    task, params, full_tokenizer, _, out, summary = trained
    assert summary["step"] == 7 and summary["box_embedding"]
    model = transformers.VisualBertForPreTraining.from_pretrained(str(out)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    # the exported tokenizer gives the model's ids: the full tokenizer's, mapped to the kept pieces
    ids = tokenizer(TEXTS[:2], padding="max_length", max_length=12, return_tensors="np")
    full = full_tokenizer(TEXTS[:2], padding="max_length", max_length=12, return_tensors="np")
    np.testing.assert_array_equal(ids["input_ids"], task.vocabulary.map(full["input_ids"]))

    rng = np.random.default_rng(0)
    features = rng.standard_normal((2, 3, 12)).astype(np.float32)
    visual_mask = np.array([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad():
        got = model(input_ids=torch.from_numpy(ids["input_ids"]), attention_mask=torch.from_numpy(ids["attention_mask"]),
                    visual_embeds=torch.from_numpy(features), visual_attention_mask=torch.from_numpy(visual_mask))
    # the Flax model without its box embedding: the same parameters, box_embeddings off
    plain = MuVLA(task.module.config, task.module.num_classes, box_embeddings=False)
    bound = plain.bind({"params": {k: v for k, v in params.items() if k != "box_embedding"}})
    hidden, pooled = bound.encode(jnp.asarray(ids["input_ids"]), jnp.asarray(ids["attention_mask"]), None, None,
                                  jnp.asarray(features), jnp.zeros((2, 3, 5)), jnp.asarray(visual_mask))
    np.testing.assert_allclose(got.prediction_logits.numpy(), np.asarray(bound.mlm_logits(hidden)), atol=1e-4)
    np.testing.assert_allclose(got.seq_relationship_logits.numpy(), np.asarray(bound.itm_logits(pooled)), atol=1e-4)


def test_the_box_embedding_is_kept_beside_the_export(trained):
    from safetensors.numpy import load_file

    _, params, _, _, out, _ = trained
    extras = load_file(str(out / EXTRAS_NAME))
    assert set(extras) == {"box_embedding.dense.kernel", "box_embedding.dense.bias",
                           "box_embedding.LayerNorm.scale", "box_embedding.LayerNorm.bias"}
    np.testing.assert_array_equal(extras["box_embedding.dense.kernel"], params["box_embedding"]["dense"]["kernel"])


def test_a_work_dir_of_another_config_or_without_checkpoints_is_refused(trained, tmp_path):
    task, _, _, workdir, _, _ = trained
    other = dataclasses.replace(task, module=MuVLA(task.module.config, num_classes=6))
    with pytest.raises(ExportError, match="differs in: network"):
        export(other, workdir, tmp_path / "a")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "model.json").write_text(json.dumps(task.fingerprint(), sort_keys=True))
    with pytest.raises(ExportError, match="no finished checkpoint"):
        export(task, empty, tmp_path / "b")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    with pytest.raises(ExportError, match="not empty"):
        export(task, workdir, taken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty_run", "taken"]  # nothing half-written
