"""Dataset examples of the world, without TensorFlow: per-example seeding and parallel generation.

Example i of split s with world seed `seed` depends only on (seed, s, i) and, for the balanced
splits, on the split's label plan (`label_plan`, drawn from `default_rng([seed, s])`). So the
examples are the same whatever the number of worker processes, and changing one split's size
changes no other split.

Parallel generation uses plain worker subprocesses (`python -m vlcore.world.examples --worker`)
talking pickle over pipes, rather than multiprocessing: a spawned multiprocessing child re-imports
the parent's __main__ module (which may import JAX or TensorFlow), and forking a process that
runs TensorFlow / JAX threads can deadlock.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vlcore.world import scenes
from vlcore.world.render import render
from vlcore.world.taxonomy import FUSION_TRAIN_CLASSES, NUM_FINE

# Split name -> index into the seed sequence. Never reorder: it would change every split's data.
SPLIT_INDEX = {"web": 0, "memory": 1, "fusion_train": 2, "test": 3, "text_corpus": 4}
SPLITS = tuple(SPLIT_INDEX)
BALANCED_SPLITS = ("memory", "fusion_train", "test")  # main fine class round-robin, then shuffled
MEMORY_STYLE_SPLITS = ("memory", "fusion_train", "test")
DISTRACTOR_FRACTION = 0.3  # of text_corpus sentences
ID_STRIDE = 100_000_000  # image_id = split index * ID_STRIDE + example index
IMAGE_SIZE = 64
_CHUNK = 400


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(img: np.ndarray) -> bytes:
    """A minimal RGB8 PNG (filter 0, zlib level 1): deterministic, ~3x faster than PIL here."""
    img = np.ascontiguousarray(img, np.uint8)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] uint8 image, got shape {img.shape}")
    h, w, _ = img.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * 3)], axis=1).tobytes()
    return b"".join([
        b"\x89PNG\r\n\x1a\n",
        _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)),
        _png_chunk(b"IDAT", zlib.compress(raw, 1)),
        _png_chunk(b"IEND", b""),
    ])


_BLANK_PNG: bytes | None = None


def blank_png() -> bytes:
    """The all-zero 64x64 RGB image used for text_corpus examples (which have no image)."""
    global _BLANK_PNG
    if _BLANK_PNG is None:
        _BLANK_PNG = encode_png(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))
    return _BLANK_PNG


def label_plan(seed: int, split: str, n: int) -> np.ndarray:
    """int64 [n]: the main object's fine class per example, or -1 for "draw it per example".

    Balanced splits get each of their classes equally often (to one), shuffled: all 30, except
    fusion_train, which shows only FUSION_TRAIN_CLASSES (18).
    """
    if split not in SPLIT_INDEX:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if split not in BALANCED_SPLITS:
        return np.full(n, -1, np.int64)
    rng = np.random.default_rng([seed, SPLIT_INDEX[split]])
    classes = np.array(FUSION_TRAIN_CLASSES if split == "fusion_train" else range(NUM_FINE), np.int64)
    return rng.permutation(classes[np.arange(n) % len(classes)])


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_INDEX[split], index])


def scene_for(seed: int, split: str, index: int, main_fine: int = -1) -> tuple[scenes.Scene, np.random.Generator]:
    """The scene of one example and the generator positioned after sampling it."""
    rng = example_rng(seed, split, index)
    return scenes.sample_scene(rng, split, main_fine=None if main_fine < 0 else int(main_fine)), rng


def make_example(seed: int, split: str, index: int, main_fine: int = -1,
                 name_prob: float = scenes.DEFAULT_NAME_PROB) -> dict:
    """One example as a plain dict in the builder's feature layout (boxes normalised, PNG bytes)."""
    image_id = SPLIT_INDEX[split] * ID_STRIDE + index
    if split == "text_corpus":
        rng = example_rng(seed, split, index)
        if rng.random() < DISTRACTOR_FRACTION:
            text = scenes.distractor_sentence(rng)
        else:
            scene = scenes.sample_scene(rng, split)
            text = scenes.web_caption(scene, rng, name_prob)
        return {
            "image_id": image_id, "image": blank_png(), "caption": text, "fine_label": -1,
            "coarse_label": -1, "objects": _empty_objects(), "relations": _empty_relations(),
            "tags": _empty_tags(),
        }
    scene, rng = scene_for(seed, split, index, main_fine)
    if split in MEMORY_STYLE_SPLITS:
        caption = scenes.memory_caption(scene, rng)
    else:
        caption = scenes.web_caption(scene, rng, name_prob)
    tags = scenes.detector_tags(scene, rng)
    # The attribute head draws from its own stream, so adding it left every other field as it was.
    attributes = scenes.detector_attributes(scene, tags, np.random.default_rng([seed, SPLIT_INDEX[split], index, 1]))
    s = float(scene.size)
    return {
        "image_id": image_id,
        "image": encode_png(render(scene, scene.size)),
        "caption": caption,
        "fine_label": scene.main.fine,
        "coarse_label": scene.main.coarse,
        "objects": {
            "bbox": np.asarray([o.box for o in scene.objects], np.float32).reshape(-1, 4) / s,
            "fine_label": np.asarray([o.fine for o in scene.objects], np.int64),
            "coarse_label": np.asarray([o.coarse for o in scene.objects], np.int64),
            "colour": [o.colour for o in scene.objects],
            "pattern": [o.pattern for o in scene.objects],
        },
        "relations": _relations(scenes.scene_graph(scene)),
        "tags": {
            "bbox": np.asarray([t.box for t in tags], np.float32).reshape(-1, 4) / s,
            "label": [t.label for t in tags],
            "confidence": np.asarray([t.confidence for t in tags], np.float32),
            "attributes": attributes,
        },
    }


def _relations(triples: list[tuple[int, str, int]]) -> dict:
    return {
        "subject": np.asarray([t[0] for t in triples], np.int32),
        "predicate": [t[1] for t in triples],
        "object": np.asarray([t[2] for t in triples], np.int32),
    }


def _empty_objects() -> dict:
    return {"bbox": np.zeros((0, 4), np.float32), "fine_label": np.zeros(0, np.int64),
            "coarse_label": np.zeros(0, np.int64), "colour": [], "pattern": []}


def _empty_relations() -> dict:
    return _relations([])


def _empty_tags() -> dict:
    return {"bbox": np.zeros((0, 4), np.float32), "label": [], "confidence": np.zeros(0, np.float32),
            "attributes": []}


def _make_chunk(task: tuple) -> list[dict]:
    seed, split, name_prob, indices, fines = task
    return [make_example(seed, split, int(i), int(f), name_prob) for i, f in zip(indices, fines)]


# --- parallel generation ---------------------------------------------------------------------


def default_workers() -> int:
    """VL_WORLD_WORKERS if set, else the number of usable cores (at most 8)."""
    env = os.environ.get("VL_WORLD_WORKERS")
    if env:
        return max(1, int(env))
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


class _Worker:
    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vlcore.world.examples", "--worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )

    def send(self, task: tuple | None) -> None:
        pickle.dump(task, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self.proc.stdin.flush()

    def receive(self) -> list[dict]:
        try:
            out = pickle.load(self.proc.stdout)
        except EOFError:
            code = self.proc.wait()
            raise RuntimeError(f"vl_world worker process died (exit code {code}); see its stderr above") from None
        if isinstance(out, BaseException):
            raise RuntimeError("vl_world worker failed") from out
        return out

    def close(self, graceful: bool = True) -> None:
        if graceful:
            try:
                self.send(None)
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                graceful = False
        if graceful:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # pragma: no cover
                graceful = False
        if not graceful:  # abandoned early (or broken): the worker may be blocked writing
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f:
                    f.close()
            except OSError:  # pragma: no cover
                pass


def generate(seed: int, split: str, n: int, name_prob: float = scenes.DEFAULT_NAME_PROB,
             workers: int | None = None, min_parallel: int = 3000) -> Iterator[tuple[int, dict]]:
    """Yields (index, example) for i in 0..n-1 in order; in worker subprocesses when n is large."""
    plan = label_plan(seed, split, n)
    workers = default_workers() if workers is None else max(1, int(workers))
    if workers == 1 or n < min_parallel:
        for i in range(n):
            yield i, make_example(seed, split, i, int(plan[i]), name_prob)
        return
    tasks = [(seed, split, name_prob, np.arange(a, min(a + _CHUNK, n)), plan[a : a + _CHUNK])
             for a in range(0, n, _CHUNK)]
    pool = [_Worker() for _ in range(min(workers, len(tasks)))]
    k = len(pool)
    done = False
    try:
        for c in range(min(2 * k, len(tasks))):  # two tasks in flight per worker
            pool[c % k].send(tasks[c])
        for c, task in enumerate(tasks):
            chunk = pool[c % k].receive()
            if c + 2 * k < len(tasks):
                pool[c % k].send(tasks[c + 2 * k])
            for i, ex in zip(task[3], chunk):
                yield int(i), ex
        done = True
    finally:
        for w in pool:
            w.close(graceful=done)


def _worker_main() -> None:
    # results go to the original stdout; anything else printed goes to stderr
    stdin, stdout = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    while True:
        try:
            task = pickle.load(stdin)
        except EOFError:
            return
        if task is None:
            return
        try:
            out = _make_chunk(task)
        except BaseException as e:  # noqa: BLE001 - sent to the parent, which raises
            out = RuntimeError(f"{type(e).__name__}: {e}")
        pickle.dump(out, stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker_main()
    else:
        sys.exit("usage: python -m vlcore.world.examples --worker (internal: a generation worker)")
