"""Shared helpers for the vlcore tests: random transformers checkpoints and comparisons.

Every parity test builds a small random PyTorch model with transformers, perturbs *all* of its
parameters (LayerNorm weights and biases included, so they are not trivially 1 and 0), saves it
as an HF directory and compares the Flax model loaded from that directory with the PyTorch one.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:  # lets plain `pytest` (not only `python -m pytest`) import vlcore
    sys.path.insert(0, _REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

torch.set_num_threads(2)
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

# fp32 parity bound between the Flax and the PyTorch implementations.
ATOL = 1e-4


def perturb_torch(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Adds N(0, scale^2) noise to every parameter (tied parameters are perturbed once)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return model


def perturb_flax(params: Any, seed: int, scale: float = 0.1) -> Any:
    """Adds N(0, scale^2) noise to every leaf of a Flax parameter tree."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    noisy = [np.asarray(x) + rng.standard_normal(np.shape(x)).astype(np.asarray(x).dtype) * scale for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x) for x in noisy])


def make_torch_model(model_cls: type, config: transformers.PretrainedConfig, seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = model_cls(config, **kwargs)
    model.set_attn_implementation("eager")  # the plain softmax(QK^T)V reference
    perturb_torch(model, seed)
    return model.eval()


def save_random_model(
    model_cls: type, config: transformers.PretrainedConfig, directory: Path, seed: int = 0, **kwargs
) -> tuple[torch.nn.Module, Path]:
    """Builds a seeded random transformers model, perturbs it, saves it; returns (model, dir)."""
    model = make_torch_model(model_cls, config, seed, **kwargs)
    directory = Path(directory)
    model.save_pretrained(directory)
    return model, directory


def to_np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def assert_close(actual: Any, expected: Any, atol: float = ATOL, what: str = "") -> float:
    """Asserts same shape and max |actual - expected| <= atol; returns the max difference."""
    a, e = to_np(actual).astype(np.float64), to_np(expected).astype(np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert np.all(np.isfinite(a)), f"{what}: non-finite values in the Flax output"
    diff = float(np.max(np.abs(a - e))) if a.size else 0.0
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol}"
    return diff


def small_bert_config(**overrides) -> transformers.BertConfig:
    base = dict(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=24, type_vocab_size=2, hidden_act="gelu", initializer_range=0.2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
    )
    base.update(overrides)
    return transformers.BertConfig(**base)


def small_clip_config(**overrides) -> transformers.CLIPConfig:
    text = dict(
        vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, hidden_act="quick_gelu", bos_token_id=50, eos_token_id=51, pad_token_id=0,
        initializer_range=0.2,
    )
    vision = dict(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=2, hidden_act="quick_gelu", initializer_range=0.2,
    )
    text.update(overrides.pop("text", {}))
    vision.update(overrides.pop("vision", {}))
    overrides.setdefault("projection_dim", 24)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, **overrides)


def random_bert_inputs(
    rng: np.random.Generator, batch: int, seq: int, vocab: int, type_vocab: int, padded: bool
) -> dict[str, np.ndarray]:
    """Random ids in [1, vocab), random token types; right padding with pad id 0 when padded."""
    ids = rng.integers(1, vocab, size=(batch, seq)).astype(np.int32)
    types = rng.integers(0, type_vocab, size=(batch, seq)).astype(np.int32)
    mask = np.ones((batch, seq), np.int32)
    if padded:
        lengths = [max(2, seq - (3 * i + 2) % seq) for i in range(batch)]
        for i, n in enumerate(lengths):
            mask[i, n:] = 0
            ids[i, n:] = 0
            types[i, n:] = 0
        assert mask.min() == 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="module")
def random_bert_dir(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A saved random BertModel (with pooler)."""
    return save_random_model(
        transformers.BertModel, small_bert_config(), tmp_path_factory.mktemp("bert"), seed=11
    )


@pytest.fixture(scope="module")
def random_mlm_dir(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A saved random BertForMaskedLM (tied decoder, no pooler)."""
    return save_random_model(
        transformers.BertForMaskedLM, small_bert_config(hidden_act="gelu_new"), tmp_path_factory.mktemp("mlm"), seed=12
    )


@pytest.fixture(scope="module")
def random_clip_dir(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A saved random CLIPModel."""
    return save_random_model(transformers.CLIPModel, small_clip_config(), tmp_path_factory.mktemp("clip"), seed=13)


def save_random_clip_with_tokenizer(directory: Path, seed: int = 0, image_size: int = 32,
                                    projection_dim: int = 24) -> tuple[torch.nn.Module, Path]:
    """A random CLIPModel saved with a working tokenizer: a byte-level CLIP BPE without merges
    (every character a token; vocabulary 514 = 2 specials + 256 bytes x {inner, word-final}),
    so texts tokenise as a real CLIP checkpoint's do, only finer."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in sorted(ByteLevel.alphabet()):
            vocab[c + suffix] = len(vocab)
    config = small_clip_config(
        text=dict(vocab_size=len(vocab), bos_token_id=0, eos_token_id=1, pad_token_id=1, max_position_embeddings=64),
        vision=dict(image_size=image_size), projection_dim=projection_dim)
    model, directory = save_random_model(transformers.CLIPModel, config, directory, seed=seed)
    transformers.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(directory)
    return model, directory


# A frozen two-tower model as `vlcore.main` leaves its work dir, with random weights (fast).
from vlcore.encoders.configs import CLIPVisionConfig  # noqa: E402

VISION = CLIPVisionConfig(image_size=64, patch_size=16, num_channels=3, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=2, hidden_act="gelu", layer_norm_eps=1e-5)


def make_two_tower_workdir(path: Path, seed: int = 0) -> tuple[Path, dict]:
    """model.json + an Orbax checkpoint holding random TwoTower parameters."""
    import dataclasses

    import orbax.checkpoint as ocp

    from vlcore.training.checkpointing import prepare_workdir
    from vlcore.two_tower.model import TwoTower

    module = TwoTower(VISION, embed_dim=384)
    params = jax.device_get(module.init(jax.random.key(seed), np.zeros((1, 64, 64, 3), np.uint8))["params"])
    prepare_workdir(path, {"model": "two_tower", "vision": dataclasses.asdict(VISION), "embed_dim": 384,
                           "text_tower": "bundled all-MiniLM-L6-v2"})
    manager = ocp.CheckpointManager((Path(path) / "checkpoints").absolute())
    manager.save(3, args=ocp.args.StandardSave({"params": params, "step": 3}))
    manager.wait_until_finished()
    manager.close()
    return Path(path), params


def checkpoint_steps(workdir: Path) -> list[int]:
    """Finalised checkpoint steps (Orbax writes to a temporary name and renames when done)."""
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def restore_state(workdir: Path, step: int | None = None) -> dict[str, Any]:
    """A checkpointed train state as numpy arrays, whatever devices or processes wrote it."""
    import orbax.checkpoint as ocp

    steps = checkpoint_steps(workdir)
    assert steps, f"no checkpoint in {workdir}"
    step = steps[-1] if step is None else step
    path = Path(workdir) / "checkpoints" / str(step) / "default"
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = checkpointer.restore(path, restore_args=restore_args)
    assert int(state["step"]) == step
    return state


def zero_gradient_param(path: str) -> bool:
    """The attention key bias: it shifts every logit of a softmax row alike, so its gradient is
    exactly zero in exact arithmetic, and Adam turns the rounding noise it gets instead into
    steps of about the learning rate, whose signs depend on the summation order (device count)."""
    return "k_proj" in path and "bias" in path


def assert_usage_error(main, argv: list[str], out: Path | None = None) -> None:
    """A benchmark CLI's `main(argv)` exits with status 2 (argparse's usage error) and writes no `out`."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert out is None or not out.exists()
