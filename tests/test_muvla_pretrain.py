"""µ-VLA pre-training: the objectives on a stand-in model against numpy, and `python -m vlcore.main
--config=configs/muvla_world.py:tiny` end to end on the tiny world.

Objective level (fast, in process): a linear stand-in for `MuVLA` and a hand-made batch with the
corpus's keys; MRFR against numpy's smooth-L1 to the ORIGINAL features, and the ITM curriculum
against the per-example losses each objective returns (the loss-level formulas themselves are
tested in test_muvla_losses.py).

End to end (subprocesses, so fake devices and several processes can be set before JAX starts):
one tiny world, frozen two-tower and corpus per module; the 1-device run is the reference of
the 8-device run, of two processes x two devices and of a run killed after its first checkpoint
and rerun. The runs are started together by a module fixture, in lanes that keep both cores busy
and let the later 1-device runs reuse the reference's compiled programs (a JAX cache per module);
bad input runs beside them. Each subprocess has a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import checkpoint_steps, restore_state, save_random_model
from test_training_core import event_files, read_file_scalars, read_scalars, snapshot

from jaxmuvla import objectives as O

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # seconds any one subprocess may take

# ---------------------------------------------------------------------------------------------
# Objective level: a stand-in model and a hand-made batch

TOKENS = O.Tokens(cls=1, sep=2, mask=3, pad=0, vocab_size=40)
LOSSES = ("tag_mlm", "mrc", "mrfr", "phrase_mlm", "p_mrtc", "itm", "sentence_mlm")  # per example, [b] each
B, R, D, T, K, L, P, CLASSES = 6, 4, 8, 6, 2, 8, 2, 5


class LinearModel:
    """A stand-in for `jaxmuvla.model.MuVLA` with the methods `objectives.Model` names: text tokens
    are rows of an embedding table, regions a projection of (feature, box); hidden = tanh of those,
    pooled = their mean over the attended positions; the heads are linear maps. Every `encode` call
    is recorded, so a test can see what an objective fed the encoder (`traced`)."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        w = lambda *shape, scale=1.0: jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)  # noqa: E731
        self.embed, self.proj, self.box = w(TOKENS.vocab_size, 16), w(D, 16, scale=0.5), w(5, 16)
        self.itm, self.cls, self.feat = w(16, 2, scale=4.0), w(16, CLASSES), w(16, D)
        self.calls: list[dict] = []

    def encode(self, input_ids, attention_mask, token_boxes, token_box_mask, features, boxes, region_mask):
        text = self.embed[input_ids]
        if token_boxes is not None:
            text = text + (token_boxes @ self.box) * token_box_mask[..., None]
        regions = features @ self.proj + boxes @ self.box
        hidden = jnp.tanh(jnp.concatenate([text, regions], axis=1))
        attended = jnp.concatenate([attention_mask, region_mask], axis=1).astype(jnp.float32)
        pooled = (hidden * attended[..., None]).sum(1) / attended.sum(1, keepdims=True)
        self.calls.append({"input_ids": input_ids, "features": features, "pooled": pooled})
        return hidden, pooled

    def mlm_logits(self, hidden):
        return hidden @ self.embed.T

    def itm_logits(self, pooled):
        return pooled @ self.itm

    def region_class_logits(self, hidden):
        return hidden @ self.cls

    def region_features(self, hidden):
        return hidden @ self.feat


def traced(model: LinearModel, fn):
    """fn returning (its output, [what each of its encode calls received and pooled])."""
    def run(*args):
        model.calls.clear()
        return fn(*args), list(model.calls)
    return run


def hand_made_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """B images with 1..R regions (features of both smooth-L1 regimes, |x| < 1 and > 1), each region
    tagged by one or two word pieces, and K sentences of L word pieces with P phrases matched to
    the regions (the corpus's layout, see `jaxmuvla.corpus`)."""
    rng = np.random.default_rng(seed)
    n_regions = np.array([4, 3, 1, 2, 4, 3])
    valid = np.arange(R)[None] < n_regions[:, None]
    features = (rng.standard_normal((B, R, D)) * 1.5).astype(np.float32) * valid[..., None]
    x0, y0 = rng.uniform(0, 0.5, (B, R)), rng.uniform(0, 0.5, (B, R))
    x1, y1 = x0 + rng.uniform(0.1, 0.5, (B, R)), y0 + rng.uniform(0.1, 0.5, (B, R))
    boxes = (np.stack([x0, y0, x1, y1, (x1 - x0) * (y1 - y0)], -1) * valid[..., None]).astype(np.float32)
    region_class = np.where(valid, rng.integers(0, CLASSES, (B, R)), -1).astype(np.int32)
    tag_ids, tag_region = np.zeros((B, T), np.int32), np.full((B, T), -1, np.int32)
    for i in range(B):
        pieces = [(int(rng.integers(5, TOKENS.vocab_size)), r) for r in range(n_regions[i])
                  for _ in range(1 + r % 2)][:T]
        for j, (piece, r) in enumerate(pieces):
            tag_ids[i, j], tag_region[i, j] = piece, r
    sentence_ids = np.zeros((B, K, L), np.int32)
    phrase_spans = np.full((B, K, P, 2), -1, np.int32)
    for i in range(B):
        for k in range(K):
            n = int(rng.integers(4, L - 1))  # words between [CLS] and [SEP]
            sentence_ids[i, k, :n + 2] = [TOKENS.cls, *rng.integers(5, TOKENS.vocab_size, n), TOKENS.sep]
            phrase_spans[i, k, 0] = (1, 3)
            if n >= 4:
                phrase_spans[i, k, 1] = (3, n + 1)
    has_phrase = phrase_spans[..., 0] >= 0  # [B, K, P]
    region_phrase = np.where(valid[:, None], rng.integers(0, P, (B, K, R)), -1)
    region_phrase = np.where(np.take_along_axis(has_phrase, np.maximum(region_phrase, 0), axis=2), region_phrase, -1)
    region_phrase_cos = np.where(region_phrase >= 0, rng.uniform(0.3, 1.0, (B, K, R)), 0.0)
    return {"region_features": features, "region_boxes": boxes, "region_class": region_class, "tag_ids": tag_ids,
            "tag_region": tag_region, "sentence_ids": sentence_ids, "phrase_spans": phrase_spans,
            "region_phrase": region_phrase.astype(np.int32), "region_phrase_cos": region_phrase_cos.astype(np.float32)}


def as_jax(batch: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in batch.items()}


def numpy_feature_loss(predicted, original, masked, kind):
    """Per example: the mean over its masked regions of the mean over dimensions (0 if none)."""
    diff = np.asarray(predicted, np.float64) - np.asarray(original, np.float64)
    per_dim = np.where(np.abs(diff) < 1.0, 0.5 * diff ** 2, np.abs(diff) - 0.5) if kind == "smooth_l1" else diff ** 2
    per_region = per_dim.mean(-1)
    return np.array([per_region[i][masked[i]].mean() if masked[i].any() else 0.0 for i in range(len(masked))])


@pytest.mark.parametrize("kind", ["smooth_l1", "l2"])
def test_mrfr_regresses_to_the_original_features_not_the_zeroed_input(kind):
    """A model that gives back the ORIGINAL features has no MRFR loss; one that gives back what the
    encoder received (the masked regions zeroed) pays numpy's loss of (0 - original) over the
    masked regions: the public code's target, the zeroed feature, would make that zero too."""
    batch = hand_made_batch()
    valid = batch["region_class"] >= 0
    s = O.ObjectiveSettings(region_rate=0.5, feature_loss=kind)

    def masked_regions(key):  # the draw region_tag_loss makes: the 4th of 4 subkeys, region_mask's rule
        return np.asarray(valid & (jax.random.uniform(jax.random.split(key, 4)[3], valid.shape) < s.region_rate))

    # A key for which some images have masked regions and some none (both cases checked).
    key = next(k for k in map(jax.random.key, range(100))
               if masked_regions(k).any() and (~masked_regions(k).any(1)).any())
    masked = masked_regions(key)
    magnitude = np.abs(batch["region_features"][masked])
    assert (magnitude < 1).any() and (magnitude > 1).any()  # both branches of smooth-L1

    model = LinearModel()
    model.region_features = lambda hidden: jnp.asarray(batch["region_features"])
    original, _ = traced(model, lambda b, k: O.region_tag_loss(model, b, k, s, TOKENS))(as_jax(batch), key)
    np.testing.assert_array_equal(np.asarray(original["mrfr"]), 0.0)

    model = LinearModel()
    model.region_features = lambda hidden: model.calls[-1]["features"]  # what the encoder received
    echoed, [call] = traced(model, lambda b, k: O.region_tag_loss(model, b, k, s, TOKENS))(as_jax(batch), key)
    received = np.asarray(call["features"])
    np.testing.assert_array_equal(received, np.where(masked[..., None], 0.0, batch["region_features"]))
    expected = numpy_feature_loss(received, batch["region_features"], masked, kind)
    assert (expected[masked.any(1)] > 0.1).all() and (expected[~masked.any(1)] == 0).all()
    np.testing.assert_allclose(np.asarray(echoed["mrfr"]), expected, rtol=1e-5, atol=1e-7)


def test_mrfr_is_the_papers_l2_by_default():
    """The paper regresses masked features with L2; smooth-L1 (the public code's) is an option."""
    from jaxmuvla.pretrain import default_config

    assert O.ObjectiveSettings().feature_loss == "l2"
    assert default_config().objectives.feature_loss == "l2"


def test_curriculum_weights_the_sentence_losses_by_an_unmasked_itm_pass_over_masked_items():
    """pretraining_loss = sum over losses of each one's mean over the batch's masked items; once the
    curriculum starts, the R-N losses and I-S's MLM (aligned pairs) are weighted per example by
    w_i = P(aligned) of (image i, its retrieved sentence) from an UNMASKED pass (recomputed here in
    numpy from that pass's pooled output); ITM is not weighted. Fails on the old rules: examples
    with nothing masked counted as zeros, w read off the masked R-N pass, ITM weighted."""
    from jaxmuvla.pretrain import TRAIN_KEYS

    batch = hand_made_batch(1)
    assert set(batch) == set(TRAIN_KEYS)  # what the trainer feeds pretraining_loss
    jbatch = as_jax(batch)
    s = O.ObjectiveSettings(curriculum_steps=3, k=K, mlm_rate=0.5, region_rate=0.5, phrase_rate=1.0, max_masked=4,
                            max_masked_regions=3)
    key = jax.random.key(7)
    k_choice, k_rt, k_rn, k_is = jax.random.split(key, 4)
    choice = np.asarray(jax.random.randint(k_choice, (B,), 0, s.k))
    sentences = {name: jnp.asarray(batch[name][np.arange(B), choice])
                 for name in ("sentence_ids", "phrase_spans", "region_phrase", "region_phrase_cos")}
    model = LinearModel(seed=3)
    rt, _ = traced(model, lambda b, k: O.region_tag_loss(model, b, k, s, TOKENS))(jbatch, k_rt)
    rn, [rn_call] = traced(model, lambda b, c, k: O.region_phrase_loss(model, b, c, k, s, TOKENS))(
        jbatch, sentences, k_rn)
    (is_, aligned), _ = traced(model, lambda b, c, k: O.image_sentence_loss(model, b, c, k, s, TOKENS))(
        jbatch, sentences, k_is)
    aligned = np.asarray(aligned)
    assert aligned.any() and (~aligned).any()
    parts = {k: np.asarray(v, np.float64) for k, v in {**rt, **rn, **is_}.items()}

    def p_aligned(pooled):
        logits = np.asarray(pooled, np.float64) @ np.asarray(model.itm, np.float64)
        return np.exp(logits[:, 0]) / np.exp(logits).sum(1)

    # the unmasked pass, computed independently: the retrieved sentence and every region as they are
    _, [clean] = traced(model, lambda: model.encode(sentences["sentence_ids"], sentences["sentence_ids"] != 0, None,
                                                    None, jbatch["region_features"], jbatch["region_boxes"],
                                                    jbatch["region_class"] >= 0))()
    w = p_aligned(clean["pooled"])
    assert np.abs(w - p_aligned(rn_call["pooled"])).max() > 1e-3  # not the masked R-N pass's
    counts = {name: parts[f"{name}_items"] for name in LOSSES}
    assert all(counts[n].sum() > 0 for n in LOSSES) and any((counts[n] == 0).any() for n in LOSSES)

    def item_mean(name, weight):
        return (weight * counts[name] * parts[name]).sum() / counts[name].sum()

    ones = np.ones(B)
    plain = sum(item_mean(n, ones) for n in LOSSES)
    weights = {"phrase_mlm": w, "p_mrtc": w, "sentence_mlm": w}
    curriculum = sum(item_mean(n, weights.get(n, ones)) for n in LOSSES)
    diluted = sum(parts[n].mean() for n in LOSSES)  # examples with nothing masked as zeros
    itm_weighted = [sum(item_mean(n, ones if n in ("tag_mlm", "mrc", "mrfr") else w_itm) for n in LOSSES)
                    for w_itm in (w, np.where(aligned, w, 1.0))]  # the paper's sum as written; positives only
    assert abs(plain - diluted) > 1e-2 and all(abs(curriculum - x) > 1e-3 for x in itm_weighted)

    loss_at = lambda step: O.pretraining_loss(model, jbatch, key, step, s, TOKENS)  # noqa: E731
    for step, expected, weight in [(0, plain, 1.0), (2, plain, 1.0), (3, curriculum, w.mean()),
                                   (50, curriculum, w.mean())]:
        loss, metrics = loss_at(jnp.asarray(step, jnp.int32))
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(float(metrics["itm_weight"]), weight, rtol=1e-5)
        for name in LOSSES:
            np.testing.assert_allclose(float(metrics[name]), item_mean(name, ones), rtol=1e-5, err_msg=name)
    never = O.ObjectiveSettings(**{**s.__dict__, "curriculum_steps": -1})
    loss, _ = O.pretraining_loss(model, jbatch, key, jnp.asarray(50), never, TOKENS)
    np.testing.assert_allclose(float(loss), plain, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# End to end: the runs


def world_args(world) -> list[str]:
    return [f"--config={REPO / 'configs' / 'muvla_world.py'}:tiny", f"--config.corpus.dir={world.corpus}",
            f"--config.corpus.encoder=two_tower:{world.two_tower}", f"--config.corpus.data_dir={world.tfds}"]


# 4 steps of one layer, each logged, a checkpoint every 2; the curriculum from step 2 ((100 - 16)
# // 8 = 10 steps an epoch): the runs train both the plain sum and the weighting.
TRAIN = ["--config.num_steps=4", "--config.save_every=2", "--config.log_every=1", "--config.batch_size=8",
         "--config.eval_images=16", "--config.model.num_layers=1", "--config.objectives.curriculum_epochs=0.2"]
# Run under `python -c`: vlcore.main, killed (SIGKILL) once step 3 is done and the checkpoint of
# step 2 is on disk: a machine lost between two checkpoints.
KILLED_AFTER_STEP_3 = """
import os, runpy, signal, sys
from vlcore.training import loop
save = loop.Checkpointer.save
def save_then_die(self, step, state, force=False):
    saved = save(self, step, state, force)
    if step == 3:
        self.manager.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)
    return saved
loop.Checkpointer.save = save_then_die
sys.argv[0] = "vlcore.main"
runpy.run_module("vlcore.main", run_name="__main__")
"""


class Run:
    """One subprocess of `python -m vlcore.main` (or `python -c code`), output to files."""

    def __init__(self, name: str, args: list[str], logs: Path, cache: Path, devices: int = 1,
                 code: str | None = None):
        self.name = name
        logs.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = logs / f"{name}.out", logs / f"{name}.err"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
        env.update(TF_CPP_MIN_LOG_LEVEL="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
                   PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
        self.cmd = [sys.executable, *(["-c", code] if code else ["-m", "vlcore.main"]), *args]
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=REPO)
        self.started = time.monotonic()

    def wait(self) -> int:
        try:
            return self.proc.wait(max(1.0, TIMEOUT - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -999

    def expect(self, code: int) -> "Run":
        returncode = self.wait()
        assert returncode == code, f"{self.name}: exit {returncode}, expected {code}\n{self.tail()}"
        return self

    def tail(self, n: int = 3000) -> str:
        return (f"--- {' '.join(self.cmd)}\n--- stdout\n{self.out_path.read_text(errors='replace')[-n:]}\n"
                f"--- stderr\n{self.err_path.read_text(errors='replace')[-n:]}")

    def error_lines(self) -> list[str]:
        return [line for line in self.err_path.read_text(errors="replace").splitlines() if line.startswith("error:")]

    def final_metrics(self) -> dict[str, float]:
        out = self.out_path.read_text()
        return json.loads(out[out.index("{"):out.index("}", out.index("{")) + 1])


class Lanes:
    """Runs started in background lanes, one after another within a lane; a step is a callable
    returning the Run(s) it started. `get(name)` waits until that run has been started."""

    def __init__(self):
        self.runs: dict[str, Run] = {}
        self.errors: list[str] = []
        self.changed = threading.Condition()
        self.threads: list[threading.Thread] = []
        self.closed = False

    def lane(self, *steps) -> None:
        def drive():
            try:
                for step in steps:
                    with self.changed:
                        if self.closed:
                            return
                    started = step()
                    with self.changed:
                        self.runs.update({run.name: run for run in started})
                        self.changed.notify_all()
                    for run in started:
                        run.wait()
            except Exception as e:  # noqa: BLE001 - reported by get()
                with self.changed:
                    self.errors.append(f"{type(e).__name__}: {e}")
            finally:
                with self.changed:
                    self.changed.notify_all()

        thread = threading.Thread(target=drive, daemon=True)
        thread.start()
        self.threads.append(thread)

    def get(self, name: str) -> Run:
        with self.changed:
            self.changed.wait_for(lambda: name in self.runs or not any(t.is_alive() for t in self.threads),
                                  timeout=3 * TIMEOUT)
            assert name in self.runs, f"{name} was not started: {self.errors}"
            return self.runs[name]

    def close(self) -> None:
        """Stops every run still going (after a failure) and starts no more."""
        with self.changed:
            self.closed = True
        for thread in self.threads:
            for run in list(self.runs.values()):
                if run.proc.poll() is None:
                    run.proc.kill()
            thread.join(TIMEOUT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world's TFDS data, a frozen two-tower (random weights, saved as vlcore.main leaves
    it) and the corpus built from them as the trainer builds it on first use (`load_corpus`)."""
    from conftest import make_two_tower_workdir
    from jaxmuvla.pretrain import load_corpus

    sys.path.insert(0, str(REPO))
    from configs.muvla_world import get_config

    tmp = tmp_path_factory.mktemp("muvla_pretrain")
    make_two_tower_workdir(tmp / "two_tower", seed=5)
    config = get_config("tiny")
    config.corpus.dir, config.corpus.encoder = str(tmp / "corpus"), f"two_tower:{tmp / 'two_tower'}"
    config.corpus.data_dir = str(tmp / "tfds")
    corpus = load_corpus(config)
    assert corpus.count == 100
    return types.SimpleNamespace(tmp=tmp, corpus=tmp / "corpus", two_tower=tmp / "two_tower", tfds=tmp / "tfds",
                                 feature_dim=int(corpus.arrays["region_features"].shape[-1]),
                                 k=config.corpus.k, max_tokens=config.corpus.max_tokens)


def test_the_grounding_probe_scores_each_region_from_that_region_alone(world):
    """`word_from_region_scores` with every region of an image present must give, for region r,
    what an image holding region r only gives: the other regions are out of attention (else the
    probe would read the class off a neighbour). Padding regions score -inf; scores are log-probs."""
    sys.path.insert(0, str(REPO))
    from configs.muvla_world import get_config
    from jaxmuvla.pretrain import PretrainTask
    from jaxmuvla.pretrain_eval import class_word_ids, word_from_region_scores

    config = get_config("tiny")
    config.corpus.dir, config.corpus.encoder = str(world.corpus), f"two_tower:{world.two_tower}"
    config.corpus.data_dir = str(world.tfds)
    task = PretrainTask(config)
    params = task.init_params(None)
    rows = task.eval_rows[:3]
    a = task.arrays(rows)
    every = np.arange(len(rows))
    features, boxes = a["region_features"][every], a["region_boxes"][every]
    classes = np.asarray(a["region_class"][every])
    classes[0, -1] = -1  # one padding region
    scores = word_from_region_scores(task, params, features, boxes, classes, batch_size=4)
    assert scores.shape == (3, classes.shape[1], len(class_word_ids(task)))
    assert np.all(np.isneginf(scores[classes < 0])) and np.all(scores[classes >= 0] <= 0)
    rng = np.random.default_rng(0)
    for i, r in [(0, 0), (1, 2), (2, 1)]:
        alone = np.full((1, classes.shape[1]), -1)
        alone[0, 0] = classes[i, r]
        noise = rng.standard_normal(features[i:i + 1].shape).astype(np.float32)  # what the others hold: noise
        noise[0, 0], box = features[i, r], rng.random(boxes[i:i + 1].shape).astype(np.float32)
        box[0, 0] = boxes[i, r]
        got = word_from_region_scores(task, params, noise, box, alone, batch_size=1)
        np.testing.assert_allclose(got[0, 0], scores[i, r], rtol=1e-4, atol=1e-4)


TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def minilm_copy(directory: Path, vocab_size: int | None = None, vocab_lines: int | None = None) -> Path:
    """The bundled MiniLM (weights linked, not copied) with config.json's vocab_size changed, or its
    vocab.txt cut to the first `vocab_lines` word pieces (tokenizer.json dropped: the tokenizer is
    then built from vocab.txt)."""
    from vlcore.sentence_encoder import bundled_minilm_path

    minilm = Path(bundled_minilm_path())
    directory.mkdir()
    for name in ("model.safetensors", *TOKENIZER_FILES):
        (directory / name).symlink_to(minilm / name)
    config = json.loads((minilm / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "vocab_size": vocab_size or config["vocab_size"]}))
    if vocab_lines:
        (directory / "tokenizer.json").unlink()
        (directory / "vocab.txt").unlink()
        words = (minilm / "vocab.txt").read_text().splitlines(keepends=True)
        (directory / "vocab.txt").write_text("".join(words[:vocab_lines]))
    return directory


def bad_checkpoints(world) -> dict[str, Path]:
    """Directories that do not fit the corpus: the bundled MiniLM with its vocabulary cut to 20,000
    word pieces (the corpus was tokenised with all 30,522), and a random VisualBERT (saved by
    transformers' PyTorch class) with MiniLM's tokenizer whose regions are 16 wide."""
    import transformers

    from vlcore.sentence_encoder import bundled_minilm_path

    out = {"cut_vocab": minilm_copy(world.tmp / "cut_vocab", vocab_lines=20000)}
    visual = out["visual_bert"] = world.tmp / "visual_bert"
    save_random_model(transformers.VisualBertForPreTraining, transformers.VisualBertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=64, visual_embedding_dim=16), visual, seed=4)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(bundled_minilm_path()) / name, visual)
    assert world.feature_dim != 16
    return out


def test_a_tokenizer_with_word_pieces_the_embeddings_lack_is_refused_before_loading(tmp_path):
    """config.json's vocab_size (the word-embedding rows) below the tokenizer's 30,522: one
    CheckpointError naming the directory and both sizes; a padded table (more rows than word
    pieces, as some checkpoints have) is accepted."""
    from jaxmuvla.model import load_text_tokenizer, muvla_from_text_checkpoint
    from vlcore.hf_checkpoint import CheckpointError

    small = minilm_copy(tmp_path / "small", vocab_size=30000)
    with pytest.raises(CheckpointError) as error:
        muvla_from_text_checkpoint(str(small), num_layers=1, feature_dim=384, num_classes=6, max_text_length=24)
    message = str(error.value)
    assert str(small) in message and "30522 word pieces" in message and "only 30000 rows" in message, message
    assert len(load_text_tokenizer(minilm_copy(tmp_path / "padded", vocab_size=30528))) == 30522


@pytest.fixture(scope="module")
def runs(world):
    """Every end-to-end run of the module, started in three lanes (see the module docstring)."""
    logs, cache, workdirs = world.tmp / "logs", world.tmp / "jax_cache", world.tmp / "wd"
    common = world_args(world)
    lanes = Lanes()
    bad = bad_checkpoints(world)
    corpus_before = snapshot(world.corpus)
    left: dict[str, list[int]] = {}  # what the killed run left

    def start(name, args, workdir=None, **kwargs):
        return [Run(name, [*common, *args, f"--workdir={workdirs / (workdir or name)}"], logs, cache, **kwargs)]

    def two_processes():
        dist = [f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2"]
        return [Run(f"proc2x2_{i}", [*common, *TRAIN, *dist, f"--process_id={i}", f"--workdir={workdirs / 'proc2x2'}"],
                    logs, cache, devices=2) for i in range(2)]

    def rerun_killed():
        left["checkpoints"] = checkpoint_steps(workdirs / "killed")
        left["logged"] = sorted(read_scalars(workdirs / "killed").get("loss", {}))
        return start("killed_rerun", TRAIN, workdir="killed")

    def after(name, step):  # waits (in its lane) for another lane's run to end first
        def wait_then_start():
            lanes.get(name).wait()
            return step()
        return wait_then_start

    # Lane 1: the reference compiles (cold cache); the killed run and its rerun reuse its programs.
    lanes.lane(lambda: start("dev1", TRAIN), lambda: start("killed", TRAIN, code=KILLED_AFTER_STEP_3), rerun_killed)
    # Lane 2: 8 fake devices, then two processes of two devices each.
    lanes.lane(lambda: start("dev8", TRAIN, devices=8), two_processes)
    # Lane 3: bad input (short runs), then the round robin once the reference's cache is there.
    lanes.lane(lambda: start("bad_vocab_file", [f"--config.model.init={bad['cut_vocab']}"]),
               lambda: start("bad_width", [f"--config.model.init={bad['visual_bert']}"]),
               lambda: start("bad_corpus", [f"--config.corpus.k={world.k + 1}",
                                            f"--config.corpus.max_tokens={world.max_tokens - 4}"]),
               after("dev1", lambda: start("round_robin", [*TRAIN, "--config.variant=round_robin"])))
    yield types.SimpleNamespace(get=lanes.get, workdir=lambda name: workdirs / name, bad=bad,
                                corpus_before=corpus_before, corpus=world.corpus, left=left,
                                feature_dim=world.feature_dim, k=world.k, max_tokens=world.max_tokens)
    lanes.close()


# ---------------------------------------------------------------------------------------------
# Reading what the runs left


def attention_key_bias(path: str) -> bool:
    """Its true gradient is zero (it shifts a whole softmax row), so Adam turns rounding noise, which
    depends on the summation order (devices, processes), into steps of random sign."""
    return "['key']['bias']" in path


def flat_params(workdir: Path, step: int | None = None) -> dict[str, np.ndarray]:
    state = restore_state(workdir, step)
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(state["params"])[0]}


# Another summation order (devices, processes) changes a gradient by rounding; where a gradient is
# itself at rounding level, Adam's normalised step still moves the parameter by up to the learning
# rate, so parameters are held to an absolute bound (the losses, gradient norms... to 1e-5 relative).
PARAM_ATOL = 1e-6


def assert_same_training(run: Path, reference: Path, rtol: float, atol: float) -> None:
    """The same final parameters (allclose, the attention key bias aside when atol > 0) and every
    logged scalar (losses per objective, ITM weight, gradient norm, learning rate, evaluation)."""
    assert checkpoint_steps(run)[-1] == checkpoint_steps(reference)[-1] == 4
    got, want = flat_params(run), flat_params(reference)
    assert got.keys() == want.keys()
    compared = [k for k in want if atol == 0 or not attention_key_bias(k)]
    assert len(compared) >= len(want) - 1
    for key in compared:
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=atol, err_msg=key)
    # The tolerance is far below what the last two steps moved the parameters by.
    halfway = flat_params(reference, 2)
    assert max(float(np.abs(want[k] - halfway[k]).max()) for k in compared) > 30 * max(atol, 1e-8)
    a, b = read_scalars(run), read_scalars(reference)
    assert a.keys() == b.keys() and {"loss", "grad_norm", "tag_mlm", "p_mrtc", "itm", "itm_weight"} <= a.keys()
    for tag in sorted(b):
        assert sorted(a[tag]) == sorted(b[tag]), f"{tag}: logged at other steps"
        np.testing.assert_allclose([a[tag][s] for s in sorted(b[tag])], [b[tag][s] for s in sorted(b[tag])],
                                   rtol=rtol, err_msg=tag)


# ---------------------------------------------------------------------------------------------
# 3. Bad input: one error line, exit 2, nothing written


BAD_INPUT = {  # run -> what its one error line must name (callables of the runs fixture)
    "bad_vocab_file": lambda r: [str(r.bad["cut_vocab"]), "20000 word pieces", "30522", str(r.corpus)],
    "bad_width": lambda r: [str(r.bad["visual_bert"]), "visual_embedding_dim 16", f"{r.feature_dim} wide"],
    "bad_corpus": lambda r: [str(r.corpus), "other settings", f"k {r.k} != {r.k + 1}",
                             f"max_tokens {r.max_tokens} != {r.max_tokens - 4}"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_bad_input_is_one_error_line_and_writes_nothing(runs, name):
    run = runs.get(name).expect(2)
    errors = run.error_lines()
    assert len(errors) == 1 and all(part in errors[0] for part in BAD_INPUT[name](runs)), run.tail()
    assert "Traceback" not in run.err_path.read_text()
    assert not runs.workdir(name).exists()
    assert snapshot(runs.corpus) == runs.corpus_before  # the corpus is only read


# ---------------------------------------------------------------------------------------------
# 2. Training end to end


@pytest.mark.slow
def test_8_devices_train_like_1(runs):
    runs.get("dev1").expect(0)
    reference = runs.workdir("dev1")
    assert checkpoint_steps(reference) == [2, 4]
    weight = read_scalars(reference)["itm_weight"]  # logged at step s: the step from state s - 1
    assert weight[1] == weight[2] == 1.0 and 0 < weight[3] < 1 and 0 < weight[4] < 1  # the curriculum from 2
    eight = runs.get("dev8").expect(0)
    assert_same_training(runs.workdir("dev8"), reference, rtol=1e-5, atol=PARAM_ATOL)
    one = runs.get("dev1").final_metrics()
    assert eight.final_metrics() == pytest.approx(one, rel=1e-5)


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(runs):
    killed = runs.get("killed")
    assert killed.wait() == -signal.SIGKILL, killed.tail()
    rerun = runs.get("killed_rerun").expect(0)
    assert runs.left == {"checkpoints": [2], "logged": [1, 2, 3]}  # killed after step 3, checkpoint of step 2
    workdir = runs.workdir("killed")
    files = event_files(workdir)
    assert len(files) == 2 and min(step for step, _ in read_file_scalars(files[-1])["loss"]) == 3  # from 2 on
    runs.get("dev1").expect(0)
    # Same programs, same batches, same keys: equal, not merely close (read_scalars also checks
    # that step 3, logged by both processes, has one value).
    assert_same_training(workdir, runs.workdir("dev1"), rtol=0, atol=0)
    assert rerun.final_metrics() == runs.get("dev1").final_metrics()


@pytest.mark.slow
def test_round_robin_alternates_text_only_and_image_only_steps(runs):
    runs.get("round_robin").expect(0)
    scalars = read_scalars(runs.workdir("round_robin"))
    assert sorted(scalars["loss"]) == [1, 2, 3, 4]
    for logged in range(1, 5):
        trained = logged - 1  # the metrics logged at step s are those of the step from state s - 1
        value = {tag: scalars[tag][logged] for tag in ("loss", "text_mlm", "tag_mlm", "mrc", "mrfr")}
        if trained % 2 == 0:  # text only: MLM on corpus sentences, no image objective
            assert value["text_mlm"] > 0 and value["tag_mlm"] == value["mrc"] == value["mrfr"] == 0, (logged, value)
            assert value["loss"] == pytest.approx(value["text_mlm"], rel=1e-6)
        else:  # image only: R-T
            assert value["text_mlm"] == 0 and value["tag_mlm"] > 0, (logged, value)
            assert value["loss"] == pytest.approx(value["tag_mlm"] + value["mrc"] + value["mrfr"], rel=1e-5)
    assert "itm" not in scalars and "phrase_mlm" not in scalars  # no retrieval-based objective


@pytest.mark.slow
def test_two_processes_of_two_devices_train_like_one(runs):
    processes = [runs.get(f"proc2x2_{i}").expect(0) for i in range(2)]
    runs.get("dev1").expect(0)
    assert_same_training(runs.workdir("proc2x2"), runs.workdir("dev1"), rtol=1e-5, atol=PARAM_ATOL)
    assert processes[0].final_metrics() == processes[1].final_metrics()
    assert processes[0].final_metrics() == pytest.approx(runs.get("dev1").final_metrics(), rel=1e-5)
