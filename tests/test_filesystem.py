"""Every stored artefact on a non-local filesystem: TensorFlow's in-memory ram://, through vlcore.fs.

ram:// stands in for gs:// offline (both go through tf.io.gfile). Each artefact written there is
compared with the same artefact written to a local directory, byte for byte, and read back to
the same values; the local run is the reference.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from retrieval.backends import Index, RetrievalError, make_index
from retrieval.memory_store import MemoryStore, MemoryWriter
from retrieval.neighbour_reader import NeighbourRows, read_all
from retrieval.precompute import precompute_neighbours
from retrieval.search import RECO_MODES
from vlcore import fs

DIM, SHARD, N_MEMORY, N_QUERIES, K, PER_SHARD = 8, 32, 150, 70, 4, 16
MODE = RECO_MODES["uni_modal_search"]["image"]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def ram():
    """A fresh ram:// directory (the filesystem is one per process), removed afterwards."""
    root = f"ram://test-{uuid.uuid4().hex}"
    yield root
    if fs.exists(root):
        fs.rmtree(root)


def tree_bytes(root: str) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `root`, on any filesystem."""
    out = {}
    for name in fs.listdir(root):
        path = fs.join(root, name)
        if fs.isdir(path):
            out.update({f"{name}/{k}": v for k, v in tree_bytes(path).items()})
        else:
            out[name] = fs.read_bytes(path)
    return out


# ----------------------------------------------------------------------------- the layer itself


@pytest.mark.parametrize("where", ["local", "ram"])
def test_fs_round_trip_and_atomic_writes(where, ram, tmp_path):
    root = fs.join(str(tmp_path) if where == "local" else ram, "a", "b")
    assert fs.is_local(root) == (where == "local") and not fs.exists(root)
    fs.makedirs(root)
    fs.makedirs(root)  # twice is fine
    assert fs.isdir(root) and not fs.isfile(root)
    target = fs.join(root, "data.bin")
    fs.write_bytes(target, b"old bytes")
    fs.write_text(fs.join(root, "note.txt"), "héllo")
    assert fs.read_bytes(target) == b"old bytes" and fs.size(target) == 9
    assert fs.read_text(fs.join(root, "note.txt")) == "héllo" and fs.isfile(target)
    assert fs.listdir(root) == ["data.bin", "note.txt"]  # no temporary object left

    with pytest.raises(RuntimeError), fs.atomic_output(target) as f:
        f.write(b"half of the new")
        raise RuntimeError("writer died")
    assert fs.read_bytes(target) == b"old bytes" and fs.listdir(root) == ["data.bin", "note.txt"]

    with fs.atomic_output(target) as f:
        f.write(b"new bytes!")
    assert fs.read_bytes(target) == b"new bytes!" and fs.listdir(root) == ["data.bin", "note.txt"]
    with fs.open(target) as f:  # random access, as the neighbour reader does
        f.seek(4)
        assert f.read(3) == b"byt"

    fs.makedirs(fs.join(root, "sub"))
    fs.write_bytes(fs.join(root, "sub", "x"), b"x")
    copy = fs.join(os.path.dirname(root), "copy")
    fs.copy_tree(root, copy)
    assert tree_bytes(copy) == tree_bytes(root) == {"data.bin": b"new bytes!", "note.txt": "héllo".encode(),
                                                    "sub/x": b"x"}
    fs.rename(fs.join(copy, "note.txt"), fs.join(copy, "data.bin"), overwrite=True)
    assert fs.listdir(copy) == ["data.bin", "sub"] and fs.read_text(fs.join(copy, "data.bin")) == "héllo"
    fs.remove(fs.join(copy, "data.bin"))
    fs.rmtree(fs.join(copy, "sub"))
    assert fs.listdir(copy) == []
    fs.rmtree(root)
    assert not fs.exists(target)


def test_a_uri_mangled_by_pathlib_is_refused():
    assert fs.fspath("gs://bucket/x") == "gs://bucket/x" and not fs.is_local("gs://bucket/x")
    with pytest.raises(ValueError, match="lost a slash"):
        fs.join(Path("gs://bucket/x"), "y")  # pathlib makes it "gs:/bucket/x"


# ------------------------------------------------------------------------------- memory store


def memory_data(n: int = N_MEMORY, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.permutation(10 * n)[:n].astype(np.int64) + 1000
    image = unit(rng.standard_normal((n, DIM)))
    return ids, {"image": image, "text": unit(image + 0.5 * rng.standard_normal(image.shape))}, \
        {"label": rng.integers(0, 9, n).astype(np.int32)}


def write_store(directory: str, data, start: int = 0, stop: int | None = None, close: bool = True) -> MemoryWriter:
    ids, emb, payload = data
    writer = MemoryWriter(directory, encoder_fingerprint="fs-test", dim=DIM, shard_size=SHARD,
                          payload_spec={"label": ((), "int32")})
    stop = len(ids) if stop is None else stop
    for i in range(start + writer.num_written, stop, 10):
        j = min(i + 10, stop)
        writer.add(ids[i:j], {m: e[i:j] for m, e in emb.items()}, {"label": payload["label"][i:j]})
    if close:
        writer.close()
    return writer


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same memory written locally and on ram://."""
    data = memory_data()
    local, ram = str(tmp_path_factory.mktemp("store")), f"ram://stores-{uuid.uuid4().hex}"
    write_store(local, data)
    write_store(ram, data)
    yield data, local, ram
    fs.rmtree(ram)


def test_memory_store_on_ram_equals_the_local_one(stores):
    data, local, ram = stores
    assert tree_bytes(ram) == tree_bytes(local)  # shards, writer.json, manifest.json
    a, b = MemoryStore.open(local), MemoryStore.open(ram)
    assert b.manifest == a.manifest and b.fingerprint() == a.fingerprint()
    np.testing.assert_array_equal(b.ids(), data[0])
    for m in ("image", "text"):
        np.testing.assert_array_equal(b.embeddings(m), data[1][m])
    np.testing.assert_array_equal(b.payload("label"), data[2]["label"])
    assert isinstance(a.shard_arrays("image")[0], np.memmap)  # local: memory-mapped
    assert not isinstance(b.shard_arrays("image")[0], np.memmap)  # ram://: read into memory


def test_an_interrupted_store_on_ram_resumes_to_the_same_bytes(stores, ram):
    data, local, _ = stores
    writer = write_store(ram, data, stop=3 * SHARD + 5, close=False)  # 3 full shards, then a crash
    assert writer.num_written == 0 and not fs.exists(fs.join(ram, "manifest.json"))
    # A crash while shard 2 was written in place: one of its files never arrived.
    fs.remove(fs.join(ram, "shard-00002", "emb-text.npy"))
    fs.write_bytes(fs.join(ram, ".tmp-manifest.json-dead"), b"{")  # and a torn temporary object
    resumed = write_store(ram, data, close=False)
    assert resumed.num_written == 2 * SHARD  # shard 2 is dropped and written again
    resumed.close()
    assert tree_bytes(ram) == tree_bytes(local)
    assert MemoryStore.open(ram).fingerprint() == MemoryStore.open(local).fingerprint()


# -------------------------------------------------------------------------- neighbour precompute


class Interrupted(Exception):
    pass


def precompute(out: str, store: MemoryStore, queries: np.ndarray, fields: dict, **kwargs):
    index = make_index("exact").build(store.embeddings("image"), store.ids())
    return precompute_neighbours(out, index=index, store=store, mode=MODE, queries=queries, k=K, fields=fields,
                                 examples_per_shard=PER_SHARD, progress=False, **kwargs)


def test_neighbour_precompute_on_ram_equals_the_local_one_and_resumes(stores, ram, tmp_path):
    _, local_store, ram_store = stores
    rng = np.random.default_rng(1)
    queries = unit(rng.standard_normal((N_QUERIES, DIM)))
    fields = {"example_id": np.arange(N_QUERIES, dtype=np.int64) + 7, "image": queries}
    local_out = str(tmp_path / "neighbours")
    precompute(local_out, MemoryStore.open(local_store), queries, fields)

    out = fs.join(ram, "neighbours")
    done = []

    def crash_after_two(name: str) -> None:
        done.append(name)
        if len(done) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        precompute(out, MemoryStore.open(ram_store), queries, fields, after_shard=crash_after_two)
    fs.write_bytes(fs.join(out, ".tmp-neighbours-00002.tfrecord-dead"), b"half a shard")
    done.clear()
    precompute(out, MemoryStore.open(ram_store), queries, fields, after_shard=done.append)
    assert done == [f"neighbours-{i:05d}.tfrecord" for i in (2, 3, 4)]  # shards 0 and 1 kept
    assert tree_bytes(out) == tree_bytes(local_out)  # shards, offsets sidecars, both JSON files

    want = read_all(local_out)
    got = read_all(out, verify=True)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    order = rng.permutation(N_QUERIES)[:25]
    rows = NeighbourRows(out).read_rows(order)
    for key in want:
        np.testing.assert_array_equal(rows[key], want[key][order])
    # Independently: the neighbour ids are numpy's top-k over the memory's image embeddings.
    sims = queries @ memory_data()[1]["image"].T
    np.testing.assert_array_equal(got["neighbour_ids"], memory_data()[0][np.argsort(-sims, axis=1)[:, :K]])


# ------------------------------------------------------------------------------------ indexes


@pytest.mark.parametrize("kind", ["exact", "faiss_flat", "scann"])
def test_index_saved_and_loaded_on_ram_searches_the_same(kind, ram, tmp_path):
    rng = np.random.default_rng(2)
    emb, queries = unit(rng.standard_normal((300, DIM))), unit(rng.standard_normal((20, DIM)))
    ids = rng.permutation(3000)[:300].astype(np.int64)
    index = make_index(kind).build(emb, ids)
    scores, found = index.search(queries, K)
    directory = fs.join(ram, "index")
    index.save(directory, "memory-fp")
    index.save(str(tmp_path), "memory-fp")
    assert sorted(tree_bytes(directory)) == sorted(tree_bytes(str(tmp_path)))  # the same files
    loaded = Index.load(directory, "memory-fp")
    assert type(loaded) is type(index) and loaded.config() == index.config()
    got_scores, got_ids = loaded.search(queries, K)
    np.testing.assert_array_equal(got_ids, found)
    np.testing.assert_allclose(got_scores, scores, rtol=1e-6)
    exact = np.argsort(-(queries @ emb.T), axis=1)[:, :K]  # numpy: these are the true top k
    np.testing.assert_array_equal(got_ids, ids[exact])
    with pytest.raises(RetrievalError, match="another memory"):
        Index.load(directory, "other-fp")
    fs.remove(fs.join(directory, "index_meta.json"))  # the meta is written last: without it, no index
    with pytest.raises(RetrievalError, match="no saved index"):
        Index.load(directory, "memory-fp")


# ------------------------------------------------------------------------------ RECO artefacts


def test_reco_artefacts_on_ram_give_the_local_training_neighbours_and_training(tmp_path):
    """A tiny RECO run (precompute, index in 2 pieces, training, evaluation) with its artefacts on
    ram://: the same neighbours, bytes, losses and metrics as with them on local disk. TFDS's data
    dir and Orbax's work dir stay local (etils.epath and tensorstore have no ram://; see docs/scale.md)."""
    from conftest import make_two_tower_workdir

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from configs.reco_world import get_config
    from jaxreco.data import SplitSpec
    from jaxreco.task import RecoTask, make_artefacts
    from vlcore.frozen_encoders import load_frozen_encoder
    from vlcore.training.loop import train

    workdir, _ = make_two_tower_workdir(tmp_path / "two_tower", seed=3)
    config = get_config("tiny")
    config.data_dir = str(tmp_path / "tfds")
    config.encoder = f"two_tower:{workdir}"
    config.encode_shard_size = 32  # several store shards, so the 2 index pieces really split
    config.encode_batch_size = 16
    config.retrieval.index_pieces = 2
    config.num_steps, config.log_every, config.save_every = 4, 1, 4
    config.async_checkpoints = False
    encoder = load_frozen_encoder(config.encoder, batch_size=config.encode_batch_size)
    r = config.retrieval
    args = (SplitSpec.from_config(config.train_data), SplitSpec.from_config(config.memory), r.mode, config.fusion.k,
            {"image": r.duplicate_threshold_image, "text": r.duplicate_threshold_text})
    results = {}
    for where, root in (("local", str(tmp_path / "artefacts")), ("ram", f"ram://reco-{uuid.uuid4().hex}")):
        config.artefacts_dir = root
        artefacts = make_artefacts(config, encoder)
        run = train(RecoTask(config, artefacts), config, tmp_path / f"run_{where}")
        results[where] = artefacts.train_arrays(*args), artefacts.train_rows(*args), artefacts.root, run
    (want, want_rows, local_root, want_run), (got, got_rows, ram_root, got_run) = results["local"], results["ram"]
    assert ram_root.startswith("ram://") and set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    index = np.random.default_rng(0).permutation(len(want_rows))[:16]
    for key, value in want_rows.read_rows(index).items():
        np.testing.assert_array_equal(got_rows.read_rows(index)[key], value)
    for kind in ("neighbours", "index", "stores"):
        names = sorted(fs.listdir(fs.join(local_root, kind)))
        assert names and names == sorted(fs.listdir(fs.join(ram_root, kind))), kind
        for d in names:
            assert tree_bytes(fs.join(ram_root, kind, d)) == tree_bytes(fs.join(local_root, kind, d)), d
    assert any(name.endswith("-p2") for name in fs.listdir(fs.join(ram_root, "index")))
    losses = [[h["loss"] for h in run.history if "loss" in h] for run in (want_run, got_run)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    assert want_run.final_metrics and got_run.final_metrics == want_run.final_metrics
    fs.rmtree(ram_root)
