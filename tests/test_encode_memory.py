"""The memory encoding job: frozen encoder x TFDS split -> memory store, resumable bit-exactly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from conftest import VISION, make_two_tower_workdir, save_random_clip_with_tokenizer
from retrieval.encode_memory import encode_memory, main as encode_main
from retrieval.memory_store import MemoryStore, MemoryStoreError
from vlcore.frozen_encoders import CLIP_MEAN, CLIP_STD, EncoderError, HFClipEncoder, TwoTowerEncoder
from vlcore.sentence_encoder import SentenceEncoder
from vlcore.tfds_arrays import split_arrays
from vlcore.tfds_pairs import PairDataError
from vlcore.training.checkpointing import prepare_workdir
from vlcore.two_tower.model import TwoTower

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vlcore.world import builder as world_builder

    return world_builder.prepare(tmp_path_factory.mktemp("world"), "tiny")


@pytest.fixture(scope="module")
def two_tower(tmp_path_factory):
    workdir, params = make_two_tower_workdir(tmp_path_factory.mktemp("two_tower"))
    return TwoTowerEncoder(workdir, batch_size=32), params


@pytest.fixture(scope="module")
def full_memory(world, two_tower, tmp_path_factory):
    out = tmp_path_factory.mktemp("memory_full")
    manifest = encode_memory(two_tower[0], world, "memory", out, payload_keys=["fine_label"], batch_size=16,
                             shard_size=32, progress=False)
    return out, manifest


def test_memory_holds_the_frozen_embeddings_of_every_pair(world, two_tower, full_memory):
    encoder, params = two_tower
    store = MemoryStore.open(full_memory[0])
    data = split_arrays(world, "memory", ["image", "caption", "fine_label"])
    n = len(data["image"])
    assert store.count == n == world.info.splits["memory"].num_examples
    np.testing.assert_array_equal(store.ids(), np.arange(n))
    # Independent computation: the Flax module on the whole split at once, MiniLM on all captions.
    module = TwoTower(VISION, embed_dim=384)
    expected_images = np.asarray(module.apply({"params": params}, data["image"], method=TwoTower.embed_images))
    np.testing.assert_allclose(store.embeddings("image"), expected_images, atol=2e-5)
    expected_texts = SentenceEncoder().encode(list(data["caption"]))
    np.testing.assert_allclose(store.embeddings("text"), expected_texts, atol=2e-5)
    np.testing.assert_array_equal(store.payload("fine_label"), data["fine_label"])
    assert store.manifest.encoder_fingerprint == encoder.fingerprint()
    assert len(store.manifest.shards) == -(-n // 32)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_after", [16, 48, 80])  # inside shard 0, inside shard 1, mid shard 2
def test_interrupted_run_resumes_to_an_identical_memory(world, two_tower, full_memory, tmp_path, stop_after):
    def interrupt(done):
        if done >= stop_after:
            raise Interrupt

    out = tmp_path / "memory"
    with pytest.raises(Interrupt):
        encode_memory(two_tower[0], world, "memory", out, payload_keys=["fine_label"], batch_size=16,
                      shard_size=32, progress=False, after_batch=interrupt)
    assert not (out / "manifest.json").exists()
    seen = []
    manifest = encode_memory(two_tower[0], world, "memory", out, payload_keys=["fine_label"], batch_size=16,
                             shard_size=32, progress=False, after_batch=seen.append)
    assert seen[0] == (stop_after // 32) * 32 + 16  # restarted at the last complete shard
    assert manifest == full_memory[1]  # same shard checksums, counts, settings
    assert manifest.fingerprint() == full_memory[1].fingerprint()


def test_finished_memory_is_returned_without_work(world, two_tower, full_memory):
    calls = []
    manifest = encode_memory(two_tower[0], world, "memory", full_memory[0], payload_keys=["fine_label"],
                             batch_size=16, shard_size=32, progress=False, after_batch=calls.append)
    assert calls == [] and manifest == full_memory[1]


def test_memory_of_another_source_is_refused_untouched(world, two_tower, full_memory):
    before = {p: p.read_bytes() for p in full_memory[0].rglob("*") if p.is_file()}
    with pytest.raises(MemoryStoreError, match="another source.*split"):
        encode_memory(two_tower[0], world, "test", full_memory[0], payload_keys=["fine_label"], batch_size=16,
                      shard_size=32, progress=False)
    assert {p: p.read_bytes() for p in full_memory[0].rglob("*") if p.is_file()} == before


def test_bad_settings_and_keys(world, two_tower, tmp_path):
    out = tmp_path / "m"
    with pytest.raises(MemoryStoreError, match="multiple of batch_size"):
        encode_memory(two_tower[0], world, "memory", out, batch_size=16, shard_size=40, progress=False)
    with pytest.raises(PairDataError, match="no split 'nope'"):
        encode_memory(two_tower[0], world, "nope", out, batch_size=16, shard_size=32, progress=False)
    with pytest.raises(PairDataError, match="payload key 'caption'"):
        encode_memory(two_tower[0], world, "memory", out, payload_keys=["caption"], progress=False)
    with pytest.raises(PairDataError, match="no feature 'captions/text'"):
        encode_memory(two_tower[0], world, "memory", out, caption_key="captions/text", progress=False)
    assert not out.exists()


def test_two_tower_workdir_errors(tmp_path):
    with pytest.raises(EncoderError, match="no model.json"):
        TwoTowerEncoder(tmp_path)
    prepare_workdir(tmp_path / "w", {"model": "two_tower", "vision": dataclasses.asdict(VISION), "embed_dim": 384,
                                     "text_tower": "bundled all-MiniLM-L6-v2"})
    with pytest.raises(EncoderError, match="no checkpoints"):
        TwoTowerEncoder(tmp_path / "w")


def test_hf_clip_encoder_matches_transformers(world, tmp_path):
    torch_model, directory = save_random_clip_with_tokenizer(tmp_path / "clip", seed=5, image_size=32)
    encoder = HFClipEncoder(directory, batch_size=8, text_batch_size=8)
    data = split_arrays(world, "test", ["image", "caption"])
    images = np.stack([np.asarray(encoder.preprocess(img)) for img in data["image"][:12]])
    assert images.shape == (12, 32, 32, 3)  # the world's 64 px, resized to the checkpoint's 32
    ours_img = encoder.encode_images(images)
    pixels = (images / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    with torch.no_grad():
        ref = torch_model.get_image_features(
            pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).astype(np.float32))).pooler_output.numpy()
        texts = list(data["caption"][:12])
        tokens = encoder.tokenizer(texts, truncation=True, max_length=64, padding="max_length", return_tensors="pt")
        ref_txt = torch_model.get_text_features(**tokens).pooler_output.numpy()
    np.testing.assert_allclose(ours_img, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(encoder.encode_texts(texts), ref_txt / np.linalg.norm(ref_txt, axis=1, keepdims=True),
                               atol=1e-5)
    with pytest.raises(EncoderError, match=r"expected \[batch, 32, 32, 3\]"):
        encoder.encode_images(data["image"][:2])


def test_cli_encodes_with_hf_clip_and_rejects_bad_input(world, tmp_path, capsys):
    _, directory = save_random_clip_with_tokenizer(tmp_path / "clip", seed=6, image_size=32)
    common = ["--dataset=vl_world/tiny", f"--data_dir={Path(world.data_dir).parents[2]}", "--split=memory"]
    assert encode_main(common + [f"--encoder=hf_clip:{directory}", f"--out={tmp_path / 'mem'}",
                                 "--batch_size=32", "--shard_size=64"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    store = MemoryStore.open(tmp_path / "mem")
    assert summary["count"] == store.count == world.info.splits["memory"].num_examples and store.dim == 24
    cases = [([f"--encoder=hf_clip:{tmp_path / 'none'}"], "error:"),
             (["--encoder=bert:x"], "two_tower:WORKDIR"),
             ([f"--encoder=hf_clip:{directory}", "--split=nope"], "no split 'nope'"),
             ([f"--encoder=hf_clip:{directory}", "--dataset=vl_world/quick"], "not prepared")]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"bad{i}"
        assert encode_main(common + args + [f"--out={out}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err, err
        assert not out.exists()


def encode_as_processes(world, encoder, out, count: int, die: tuple[int, int] | None = None, timeout: float = 60):
    """encode_memory as `count` processes (tests/threaded_processes.py). die=(p, rows): process p
    fails once it has encoded `rows` rows (the others then time out at the barrier, as a job's hosts
    do when one is lost). Returns (results, [(process, done)])."""
    from threaded_processes import run_as_processes

    progress: list[tuple[int, int]] = []

    def process(p: int, barrier):
        def after_batch(done: int) -> None:
            progress.append((p, done))
            if die is not None and die[0] == p and sum(q == p for q, _ in progress) * 16 >= die[1]:
                raise Interrupt
        return encode_memory(encoder, world, "memory", out, payload_keys=["fine_label"], batch_size=16,
                             shard_size=32, progress=False, after_batch=after_batch, process_index=p,
                             process_count=count, barrier=barrier)

    return run_as_processes(process, count, timeout=timeout, expected=(Interrupt,)), progress


def store_files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("count", [2, 3])
def test_processes_sharing_the_encoding_write_the_one_process_store(world, two_tower, full_memory, tmp_path, count):
    out = tmp_path / "memory"
    results, progress = encode_as_processes(world, two_tower[0], out, count)
    assert all(r == full_memory[1] for r in results), results
    # 120 pairs in shards of 32: the full shards 0, 1, 2 go to process i % count, the tail to process 0.
    for p in range(count):
        mine = {done for q, done in progress if q == p}
        shards = {(done - 1) // 32 for done in mine}
        assert shards == {i for i in range(3) if i % count == p} | ({3} if p == 0 else set()), (p, shards)
    assert store_files(out) == store_files(full_memory[0])  # every byte; no .parts left


def test_a_killed_multi_process_encoding_resumes_to_the_same_store(world, two_tower, full_memory, tmp_path):
    out = tmp_path / "memory"
    results, _ = encode_as_processes(world, two_tower[0], out, 2, die=(1, 16), timeout=5)  # mid shard 1
    assert isinstance(results[1], Interrupt) and isinstance(results[0], TimeoutError)
    assert not (out / "manifest.json").exists() and (out / ".parts" / "shard-00000" / "manifest.json").exists()
    results, progress = encode_as_processes(world, two_tower[0], out, 2)  # the same command again
    assert all(r == full_memory[1] for r in results)
    assert {(done - 1) // 32 for q, done in progress if q == 0} == {3}  # shards 0, 2 kept; only the tail
    assert {(done - 1) // 32 for q, done in progress if q == 1} == {1}  # shard 1 again, from its start
    assert store_files(out) == store_files(full_memory[0])


def test_process_arguments_are_checked(world, two_tower, tmp_path):
    with pytest.raises(MemoryStoreError, match="needs a barrier"):
        encode_memory(two_tower[0], world, "memory", tmp_path / "a", process_index=0, process_count=2)
    with pytest.raises(MemoryStoreError, match="process_index=2"):
        encode_memory(two_tower[0], world, "memory", tmp_path / "b", process_index=2, process_count=2,
                      barrier=lambda name: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
