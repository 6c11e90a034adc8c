"""Flax CLIP vs transformers' PyTorch CLIPModel on random checkpoints (fp32, max abs diff <= 1e-4)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import assert_close, save_random_model, small_clip_config
from vlcore.encoders.clip import CLIPModel, CLIPTextTransformer, CLIPVisionTransformer
from vlcore.hf_checkpoint import load_pretrained

# Each case: the HF config, the EOT token id the "tokenizer" writes, bos/pad ids, content id range.
CASES = {
    # quick_gelu, 32 px / 8 px patches, a proper EOS id inside the vocab that is *not* the highest id in the
    # sequence (BOS is), so argmax pooling would pick the wrong token; pad id 0.
    "quick_gelu-32x8-eos51": dict(
        config=dict(text=dict(bos_token_id=52, eos_token_id=51)),
        eot=51, bos=52, pad=0, content=(3, 50),
    ),
    # exact gelu, 48 px / 16 px patches, wider/narrower towers, pad id == EOS id (pooling must take the first).
    "gelu-48x16-pad_is_eos": dict(
        config=dict(
            text=dict(vocab_size=40, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
                      max_position_embeddings=12, hidden_act="gelu", bos_token_id=38, eos_token_id=39,
                      pad_token_id=39),
            vision=dict(image_size=48, patch_size=16, hidden_size=64, intermediate_size=80, num_hidden_layers=1,
                        num_attention_heads=4, hidden_act="gelu"),
            projection_dim=16, logit_scale_init_value=1.5,
        ),
        eot=39, bos=38, pad=39, content=(3, 38),
    ),
    # gelu_new / gelu_pytorch_tanh, 30 px / 10 px patches, legacy eos_token_id=2 (argmax pooling: EOT is the
    # highest id of the vocab), non-default LayerNorm epsilon.
    "gelu_new-30x10-legacy_eos2": dict(
        config=dict(
            text=dict(vocab_size=49, hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=5,
                      max_position_embeddings=20, hidden_act="gelu_new", bos_token_id=47, eos_token_id=2,
                      pad_token_id=1, layer_norm_eps=1e-6),
            vision=dict(image_size=30, patch_size=10, hidden_size=24, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=3, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
            projection_dim=8,
        ),
        eot=48, bos=47, pad=1, content=(3, 47),
    ),
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def clip_case(request, tmp_path_factory):
    case = CASES[request.param]
    hf_config = small_clip_config(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in case["config"].items()})
    seed = list(CASES).index(request.param)
    torch_model, directory = save_random_model(
        transformers.CLIPModel, hf_config, tmp_path_factory.mktemp("clip"), seed=100 + seed
    )
    pretrained = load_pretrained(directory)
    return dict(case, torch=torch_model, pretrained=pretrained, seed=seed)


def make_texts(case, n: int, padded: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """[bos, content..., eot, pad...] rows; right padding with attention_mask 0 after the EOT when padded."""
    seq = case["pretrained"].config.text.max_position_embeddings - (1 if padded else 0)
    lo, hi = case["content"]
    ids = np.full((n, seq), case["pad"], np.int64)
    mask = np.zeros((n, seq), np.int64)
    for i in range(n):
        length = seq if not padded else int(rng.integers(3, seq))  # < seq: at least one padded position
        if padded and i == 0:
            length = 3 if n > 1 else seq - 2
        ids[i, 0] = case["bos"]
        ids[i, 1:length - 1] = rng.integers(lo, hi, size=length - 2)
        ids[i, length - 1] = case["eot"]
        mask[i, :length] = 1
    if padded:
        assert mask.min() == 0
        return ids, mask
    return ids, None


def flax_outputs(pretrained, images, ids, mask):
    """__call__, both feature methods and both bare towers, in one jitted program (compiles once)."""
    module, cfg = pretrained.module, pretrained.config

    @jax.jit
    def run(params, images, ids, mask):
        variables = {"params": params}
        return (
            module.apply(variables, images, ids, mask),
            module.apply(variables, images, method=CLIPModel.get_image_features),
            module.apply(variables, ids, mask, method=CLIPModel.get_text_features),
            CLIPVisionTransformer(cfg.vision).apply({"params": params["vision_model"]}, images),
            CLIPTextTransformer(cfg.text).apply({"params": params["text_model"]}, ids, mask),
        )

    return run(pretrained.params, images, ids, mask)


def torch_kwargs(ids: np.ndarray, mask: np.ndarray | None) -> dict:
    out = {"input_ids": torch.from_numpy(ids)}
    if mask is not None:
        out["attention_mask"] = torch.from_numpy(mask)
    return out


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("n_images,n_texts", [(1, 1), (4, 5)], ids=["batch1", "batch4"])
def test_clip_matches_transformers(clip_case, n_images, n_texts, padded):
    rng = np.random.default_rng(7 + 10 * clip_case["seed"] + n_images + padded)
    pretrained, tm = clip_case["pretrained"], clip_case["torch"]
    cfg = pretrained.config
    assert isinstance(pretrained.module, CLIPModel)
    v = cfg.vision
    images = rng.standard_normal((n_images, v.image_size, v.image_size, v.num_channels)).astype(np.float32)
    ids, mask = make_texts(clip_case, n_texts, padded, rng)
    jmask = None if mask is None else jnp.asarray(mask, jnp.int32)
    jids = jnp.asarray(ids, jnp.int32)
    pixel_values = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

    with torch.no_grad():
        ref = tm(pixel_values=pixel_values, **torch_kwargs(ids, mask))
        ref_img = tm.get_image_features(pixel_values=pixel_values).pooler_output
        ref_txt = tm.get_text_features(**torch_kwargs(ids, mask)).pooler_output
        ref_vis = tm.vision_model(pixel_values=pixel_values)
        ref_text = tm.text_model(**torch_kwargs(ids, mask))

    out, img, txt, vis, text = flax_outputs(pretrained, jnp.asarray(images), jids, jmask)
    assert out["logits_per_image"].shape == (n_images, n_texts)
    assert out["logits_per_text"].shape == (n_texts, n_images)
    for name in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
        assert_close(out[name], getattr(ref, name), what=name)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out["image_embeds"]), axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out["text_embeds"]), axis=-1), 1.0, atol=1e-5)

    assert img.shape == (n_images, cfg.projection_dim) and txt.shape == (n_texts, cfg.projection_dim)
    assert_close(img, ref_img, what="get_image_features")
    assert_close(txt, ref_txt, what="get_text_features")

    assert_close(vis["last_hidden_state"], ref_vis.last_hidden_state, what="vision last_hidden_state")
    assert_close(vis["pooler_output"], ref_vis.pooler_output, what="vision pooler_output")

    hidden, ref_hidden = np.asarray(text["last_hidden_state"]), ref_text.last_hidden_state.numpy()
    if mask is not None:  # the real tokens first, then every position (padded queries included)
        real = mask.astype(bool)
        assert_close(hidden[real], ref_hidden[real], what="text last_hidden_state (real tokens)")
    assert_close(hidden, ref_hidden, what="text last_hidden_state (all positions)")
    assert_close(text["pooler_output"], ref_text.pooler_output, what="text pooler_output")
    # Independently of transformers: the pooled vector is the final hidden state at the EOT token.
    eot_position = (mask.sum(axis=1) if mask is not None else np.full(n_texts, ids.shape[1])) - 1
    np.testing.assert_array_equal(np.asarray(text["pooler_output"]), hidden[np.arange(n_texts), eot_position])


def test_config_read_from_hf(clip_case):
    """The Flax config carries the HF fields that change the computation."""
    cfg, hf = clip_case["pretrained"].config, clip_case["torch"].config
    for ours, theirs in ((cfg.text, hf.text_config), (cfg.vision, hf.vision_config)):
        for field in dataclasses.fields(ours):
            assert getattr(ours, field.name) == getattr(theirs, field.name), field.name
    assert cfg.projection_dim == hf.projection_dim
