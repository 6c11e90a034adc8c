"""Neighbour precompute and its tf.data reader over a real memory, index and TFRecord files.

Every neighbour value is checked against numpy brute force over the raw arrays the memory was
written from; every shard byte of a resumed run against an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval import precompute as precompute_mod
from retrieval.backends import RetrievalError, make_index
from retrieval.memory_store import MemoryStore, MemoryWriter
from retrieval.neighbour_reader import NeighbourRows, neighbour_dataset, read_all
from retrieval.precompute import precompute_neighbours
from retrieval.search import RECO_MODES, SearchMode

N_MEMORY, DIM, N_QUERIES, K, PER_SHARD = 600, 16, 250, 5, 64
MODE = RECO_MODES["uni_modal_search"]["image"]  # search images, return the pairs' texts


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    label = rng.integers(0, len(centres), n)
    return unit(centres[label] + 0.35 * rng.standard_normal((n, centres.shape[1]))), label.astype(np.int64)


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    """600 clustered image-text pairs with shuffled, non-contiguous ids, in 5 shards of <= 128."""
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((12, DIM)))
    image, _ = clustered(rng, centres, N_MEMORY)
    text = unit(image + 0.5 * rng.standard_normal(image.shape))
    ids = rng.permutation(np.arange(N_MEMORY, dtype=np.int64) * 7 + 100)
    directory = tmp_path_factory.mktemp("memory")
    writer = MemoryWriter(directory, encoder_fingerprint="test-encoders", dim=DIM, shard_size=128)
    writer.add(ids, {"image": image, "text": text})
    writer.close()
    store = MemoryStore.open(directory)
    index = make_index("exact").build(store.embeddings("image"), store.ids())
    queries, label = clustered(rng, centres, N_QUERIES)
    fields = {
        "image_embedding": queries,
        "text_embedding": unit(rng.standard_normal((N_QUERIES, DIM))),
        "label": label,
        "example_id": rng.permutation(N_QUERIES).astype(np.int64) + 5000,
        "tokens": rng.integers(0, 1000, (N_QUERIES, 3)).astype(np.int32),  # an int field with a shape
    }
    raw = {"ids": ids, "image": image, "text": text}
    return types.SimpleNamespace(store=store, index=index, raw=raw, queries=queries, fields=fields)


def run(memory, out_dir, **overrides):
    kwargs = dict(index=memory.index, store=memory.store, mode=MODE, queries=memory.queries, k=K,
                  fields=memory.fields, examples_per_shard=PER_SHARD, progress=False)
    kwargs.update(overrides)
    return precompute_neighbours(out_dir, **kwargs)


@pytest.fixture(scope="module")
def outputs(memory, tmp_path_factory):
    """One uninterrupted precompute per embedding dtype (4 shards: 64, 64, 64, 58)."""
    dirs = {}
    for dtype in ("float32", "float16"):
        dirs[dtype] = tmp_path_factory.mktemp(f"neighbours-{dtype}")
        run(memory, dirs[dtype], embedding_dtype=dtype)
    return dirs


def check_top_k(got: dict, raw: dict, queries: np.ndarray, k: int, exclude_rows=None) -> np.ndarray:
    """Asserts got's neighbours are the top k by float64 numpy brute force; returns their memory rows.

    Where two of a query's top k+1 scores tie within float32 rounding the order is not defined,
    so there the ids are checked through their scores; everywhere else they must equal argsort's.
    """
    sims = queries.astype(np.float64) @ raw["image"].astype(np.float64).T
    if exclude_rows is not None:
        sims[np.arange(len(queries)), exclude_rows] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k + 1]
    top = np.take_along_axis(sims, order, axis=1)
    np.testing.assert_allclose(got["neighbour_scores"], top[:, :k], atol=1e-5)  # the k best, descending
    sorter = np.argsort(raw["ids"])
    got_rows = sorter[np.searchsorted(raw["ids"], got["neighbour_ids"], sorter=sorter)]
    np.testing.assert_array_equal(raw["ids"][got_rows], got["neighbour_ids"])  # real memory ids
    np.testing.assert_allclose(np.take_along_axis(sims, got_rows, axis=1), got["neighbour_scores"], atol=1e-5)
    assert all(len(set(r)) == k for r in got_rows.tolist())
    clear = np.diff(-top, axis=1).min(axis=1) > 1e-5
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(got_rows[clear], order[clear, :k])
    return got_rows


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_read_all_equals_numpy_brute_force(memory, outputs, dtype):
    got = read_all(outputs[dtype])
    rows = check_top_k(got, memory.raw, memory.queries, K)
    payload = memory.raw["text"][rows]  # the matched pairs' *text* embeddings, gathered in numpy
    if dtype == "float16":
        payload = payload.astype(np.float16).astype(np.float32)
        assert not np.array_equal(got["neighbour_embeddings"], memory.raw["text"][rows])  # really rounded
    np.testing.assert_array_equal(got["neighbour_embeddings"], payload)
    assert got["neighbour_embeddings"].dtype == np.float32 and got["neighbour_ids"].dtype == np.int64
    assert set(got) == set(memory.fields) | {"neighbour_ids", "neighbour_scores", "neighbour_embeddings"}
    for name, want in memory.fields.items():
        assert got[name].shape == want.shape
        np.testing.assert_array_equal(got[name], want)


def test_manifest_describes_the_shards(memory, outputs):
    manifest = precompute_mod.load_manifest(outputs["float16"])
    assert (manifest.n, manifest.k, manifest.dim, manifest.mode) == (N_QUERIES, K, DIM, MODE)
    assert manifest.memory_fingerprint == memory.store.fingerprint()
    assert manifest.shard_files == tuple(f"neighbours-{i:05d}.tfrecord" for i in range(4))
    assert [s.count for s in manifest.shards] == [64, 64, 64, 58]
    assert manifest.field_specs["tokens"] == precompute_mod.FieldSpec("int64", (3,))
    assert manifest.field_specs["image_embedding"] == precompute_mod.FieldSpec("float32", (DIM,))
    assert manifest.field_specs["label"] == precompute_mod.FieldSpec("int64", ())
    assert sorted(p.name for p in outputs["float16"].iterdir()) == sorted(
        ["manifest.json", "precompute.json", *manifest.shard_files,
         *map(precompute_mod.offsets_name, manifest.shard_files)])  # no temp file left behind
    for name in manifest.shard_files:  # the sidecars: the offsets the length headers give
        np.testing.assert_array_equal(np.load(outputs["float16"] / precompute_mod.offsets_name(name)),
                                      precompute_mod.scan_record_offsets(outputs["float16"] / name))
    for s in manifest.shards:
        assert s.sha256 == precompute_mod.file_sha256(outputs["float16"] / s.name)
    # float16 payload: 2 bytes instead of 4 per value, the rest of each record unchanged.
    size = {d: sum((outputs[d] / f).stat().st_size for f in manifest.shard_files) for d in outputs}
    assert size["float32"] - size["float16"] >= N_QUERIES * K * DIM * 2 - 16 * N_QUERIES


def test_fast_float_encoding_is_the_standard_protobuf_encoding():
    import tensorflow as tf

    rng = np.random.default_rng(5)
    for row in (np.zeros(0, np.float32), rng.standard_normal(3).astype(np.float32),
                rng.standard_normal(5000).astype(np.float32)):  # 5000 * 4 bytes: a 3-byte length
        standard = tf.train.Feature(float_list=tf.train.FloatList(value=row.tolist()))
        assert precompute_mod.float_list_feature(tf, row).SerializeToString() == standard.SerializeToString()


# --------------------------------------------------------------------------------- tf.data


def epoch_ids(directory, **kwargs) -> np.ndarray:
    ds = neighbour_dataset(directory, **{"batch_size": 32, **kwargs})
    return np.concatenate([b["example_id"] for b in ds.as_numpy_iterator()])


def test_shuffled_epoch_covers_every_example_once_with_rows_aligned(memory, outputs):
    table = read_all(outputs["float16"])
    row_of = {int(e): i for i, e in enumerate(table["example_id"])}
    ds = neighbour_dataset(outputs["float16"], batch_size=32, shuffle_seed=3)
    seen = []
    for batch in ds.as_numpy_iterator():
        b = len(batch["example_id"])
        assert batch["neighbour_embeddings"].shape == (b, K, DIM)
        assert batch["neighbour_ids"].shape == batch["neighbour_scores"].shape == (b, K)
        assert batch["tokens"].shape == (b, 3) and batch["image_embedding"].shape == (b, DIM)
        rows = [row_of[int(e)] for e in batch["example_id"]]
        for key in table:  # every tensor of the example travels with it through the shuffle
            np.testing.assert_array_equal(batch[key], table[key][rows], err_msg=key)
        seen.extend(batch["example_id"].tolist())
    assert sorted(seen) == sorted(memory.fields["example_id"].tolist())
    assert seen != table["example_id"].tolist()  # shuffled, not file order


def test_shuffle_is_deterministic_given_the_seed(memory, outputs):
    a = epoch_ids(outputs["float32"], shuffle_seed=7)
    np.testing.assert_array_equal(a, epoch_ids(outputs["float32"], shuffle_seed=7))
    b = epoch_ids(outputs["float32"], shuffle_seed=8)
    assert not np.array_equal(a, b) and sorted(a) == sorted(b)
    np.testing.assert_array_equal(epoch_ids(outputs["float32"], shuffle_seed=None), memory.fields["example_id"])


def test_repeat_reshuffles_each_epoch_and_drop_remainder_fixes_the_batch_shape(memory, outputs):
    ds = neighbour_dataset(outputs["float32"], batch_size=50, shuffle_seed=1, repeat=True, drop_remainder=True)
    assert ds.element_spec["neighbour_embeddings"].shape.as_list() == [50, K, DIM]
    ids = np.concatenate([b["example_id"] for b in ds.take(10).as_numpy_iterator()])  # 2 epochs of 250
    first, second = ids[:N_QUERIES], ids[N_QUERIES:]
    assert sorted(first) == sorted(second) == sorted(memory.fields["example_id"])
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("process_count", [2, 3, 5])
def test_process_shards_are_disjoint_and_cover_everything(memory, outputs, process_count):
    parts = [epoch_ids(outputs["float32"], shuffle_seed=0, process_index=p, process_count=process_count)
             for p in range(process_count)]
    union = np.concatenate(parts)
    assert len(union) == len(set(union.tolist())) == N_QUERIES  # disjoint, nothing lost
    assert set(union.tolist()) == set(memory.fields["example_id"].tolist())
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # every host gets the same steps


def test_fields_selects_what_is_parsed(memory, outputs):
    got = read_all(outputs["float32"], fields=["label", "neighbour_ids"])
    assert set(got) == {"label", "neighbour_ids"}
    np.testing.assert_array_equal(got["label"], memory.fields["label"])
    with pytest.raises(RetrievalError, match="unknown.*caption"):
        neighbour_dataset(outputs["float32"], batch_size=8, fields=["caption"])


# ------------------------------------------------------------------------------- exclusion


def test_exclusion_drops_each_queries_own_memory_entry(memory, tmp_path):
    rows = np.arange(0, N_MEMORY, 3)[:100]  # memory items queried with themselves (score 1.0)
    queries, own = memory.raw["image"][rows], memory.raw["ids"][rows]
    run(memory, tmp_path / "out", queries=queries, exclude_ids=own, fields={"example_id": own})
    got = read_all(tmp_path / "out")
    assert not np.any(got["neighbour_ids"] == own[:, None])
    check_top_k(got, memory.raw, queries, K, exclude_rows=rows)
    assert precompute_mod.load_manifest(tmp_path / "out").exclude_ids


# ---------------------------------------------------------------------------------- resume


class Interrupted(Exception):
    pass


def interrupt_after(shards: int) -> tuple[list[str], Any]:
    """(the shard names written, an after_shard hook that raises once ``shards`` are written)."""
    written = []

    def after_shard(name: str) -> None:
        written.append(name)
        if len(written) == shards:
            raise Interrupted

    return written, after_shard


def test_interrupted_run_resumes_to_byte_identical_shards(memory, outputs, tmp_path):
    out = tmp_path / "out"
    written, hook = interrupt_after(3)
    with pytest.raises(Interrupted):
        run(memory, out, after_shard=hook)
    assert written == [f"neighbours-{i:05d}.tfrecord" for i in (0, 1, 2)]
    assert not (out / "manifest.json").exists()
    (out / ".tmp-neighbours-00003.tfrecord-dead").write_bytes(b"half a shard")  # a crash mid-write
    shard1 = out / "neighbours-00001.tfrecord"
    shard1.write_bytes(shard1.read_bytes()[:-7])  # torn: its last record no longer reads back
    # Readable but with the wrong example count (58 records where 64 belong).
    shutil.copyfile(outputs["float32"] / "neighbours-00003.tfrecord", out / "neighbours-00002.tfrecord")
    (out / "neighbours-00000.offsets.npy").unlink()  # shard 0 is kept: its sidecar is made again

    written, hook = interrupt_after(99)
    run(memory, out, after_shard=hook)
    assert written == [f"neighbours-{i:05d}.tfrecord" for i in (1, 2, 3)]  # shard 0 kept, 1 and 2 redone
    assert snapshot(out) == snapshot(outputs["float32"])  # every shard, both JSON files
    written.clear()
    again = run(memory, out, after_shard=hook)  # finished: returned without work
    assert written == [] and again == precompute_mod.load_manifest(outputs["float32"])


def test_resume_with_other_settings_is_refused_and_touches_nothing(memory, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        run(memory, out, after_shard=interrupt_after(1)[1])
    (out / ".tmp-stale").write_bytes(b"x")
    before = snapshot(out)
    with pytest.raises(RetrievalError, match=r"differs in: k\)"):
        run(memory, out, k=K + 1)
    changed = memory.queries.copy()
    changed[17] = memory.queries[18]
    with pytest.raises(RetrievalError, match="inputs_sha256"):
        run(memory, out, queries=changed)
    with pytest.raises(RetrievalError, match="embedding_dtype"):
        run(memory, out, embedding_dtype="float16")
    assert snapshot(out) == before


def test_finished_precompute_with_other_settings_is_refused(memory, outputs):
    before = snapshot(outputs["float32"])
    with pytest.raises(RetrievalError, match="examples_per_shard"):
        run(memory, outputs["float32"], examples_per_shard=100)
    assert snapshot(outputs["float32"]) == before


# ------------------------------------------------------------------------------ bad inputs


def _nan_queries(m):
    q = m.queries.copy()
    q[3, 2] = np.nan
    return {"queries": q}


def _inf_queries(m):
    q = m.queries.copy()
    q[200, 0] = np.inf
    return {"queries": q}


BAD_INPUTS = {
    "dimension": (lambda m: {"queries": m.queries[:, :8]}, r"dimension mismatch.*dim 8.*dim 16"),
    "not 2-D": (lambda m: {"queries": m.queries[0]}, r"queries: expected a 2-D"),
    "empty queries": (lambda m: {"queries": m.queries[:0]}, r"queries: empty"),
    "k too large": (lambda m: {"k": N_MEMORY + 1}, r"k=601 exceeds the memory size 600"),
    "k zero": (lambda m: {"k": 0}, r"k: expected an int >= 1"),
    "nan": (_nan_queries, r"non-finite.*row 3"),
    "inf": (_inf_queries, r"non-finite.*row 200"),
    "field length": (lambda m: {"fields": {**m.fields, "label": m.fields["label"][:-1]}},
                     r"fields\['label'\]: leading dimension must be the 250"),
    "reserved field": (lambda m: {"fields": {"neighbour_ids": m.fields["label"]}}, r"reserved"),
    "modality": (lambda m: {"mode": SearchMode("image", "image", "audio")}, r"no 'audio' embeddings"),
    "index size": (lambda m: {"index": make_index("exact").build(m.store.embeddings("image")[:599],
                                                                 m.store.ids()[:599])},
                   r"index: holds 599 entries but the memory has 600"),
    "exclude_ids length": (lambda m: {"exclude_ids": np.arange(3)}, r"exclude_ids: expected \[250\]"),
    "embedding dtype": (lambda m: {"embedding_dtype": "bfloat16"}, r"embedding_dtype"),
    "examples_per_shard": (lambda m: {"examples_per_shard": 0}, r"examples_per_shard"),
    "empty memory": (lambda m: {"store": types.SimpleNamespace(count=0, dim=DIM, modalities=("image", "text"))},
                     r"memory is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_before_anything_is_written(memory, tmp_path, case):
    change, message = BAD_INPUTS[case]
    with pytest.raises(RetrievalError, match=message):
        run(memory, tmp_path / "out" / "nested", **change(memory))
    assert not (tmp_path / "out").exists()


def test_reader_refuses_an_unfinished_directory(memory, tmp_path):
    with pytest.raises(Interrupted):
        run(memory, tmp_path / "out", after_shard=interrupt_after(1)[1])
    for read in (lambda d: neighbour_dataset(d, batch_size=4), read_all):
        with pytest.raises(RetrievalError, match="not a finished precompute"):
            read(tmp_path / "out")
        with pytest.raises(RetrievalError, match="not a finished precompute"):
            read(tmp_path / "never-written")


def test_reader_refuses_a_missing_or_corrupt_shard(outputs, tmp_path):
    missing = Path(shutil.copytree(outputs["float32"], tmp_path / "missing"))
    (missing / "neighbours-00002.tfrecord").unlink()
    with pytest.raises(RetrievalError, match="neighbours-00002.tfrecord: shard listed in the manifest is missing"):
        neighbour_dataset(missing, batch_size=4)

    corrupt = Path(shutil.copytree(outputs["float32"], tmp_path / "corrupt"))
    shard = corrupt / "neighbours-00001.tfrecord"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped inside a record
    shard.write_bytes(bytes(data))
    with pytest.raises(RetrievalError, match="neighbours-00001.tfrecord: shard is corrupt"):
        neighbour_dataset(corrupt, batch_size=4, verify=True)
    with pytest.raises(RetrievalError, match="unreadable shard"):  # the record CRC catches it anyway
        read_all(corrupt)
    manifest = json.loads((corrupt / "manifest.json").read_text())
    assert manifest["shards"][1]["sha256"] != precompute_mod.file_sha256(shard)


# --------------------------------------------------------------------- random access (training)


def test_random_access_rows_equal_the_sequential_read_in_any_order(memory, outputs):
    for dtype in ("float32", "float16"):
        table = read_all(outputs[dtype])
        rows = NeighbourRows(outputs[dtype])
        assert len(rows) == N_QUERIES and rows.keys == tuple(table)
        rng = np.random.default_rng(1)
        for index in (rng.permutation(N_QUERIES)[:77], np.array([249, 0, 63, 64, 64, 128]), np.arange(N_QUERIES)):
            got = rows.read_rows(index)  # across shard boundaries, repeated rows, the whole split
            assert set(got) == set(table)
            for key in table:
                np.testing.assert_array_equal(got[key], table[key][index], err_msg=key)
        only = NeighbourRows(outputs[dtype], fields=("image_embedding", "neighbour_embeddings")).read_rows([5, 3])
        assert set(only) == {"image_embedding", "neighbour_embeddings"}
        np.testing.assert_array_equal(only["neighbour_embeddings"], table["neighbour_embeddings"][[5, 3]])


def test_random_access_without_sidecars_scans_the_length_headers(outputs, tmp_path):
    old = Path(shutil.copytree(outputs["float32"], tmp_path / "old"))  # as written before the sidecars
    for p in old.glob("*.offsets.npy"):
        p.unlink()
    index = np.array([200, 1, 130])
    want = NeighbourRows(outputs["float32"]).read_rows(index)
    got = NeighbourRows(old).read_rows(index)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_random_access_refuses_bad_rows_and_a_lying_sidecar(outputs, tmp_path):
    rows = NeighbourRows(outputs["float32"])
    with pytest.raises(RetrievalError, match=r"out of range \[0, 250\)"):
        rows.read_rows([0, 250])
    with pytest.raises(RetrievalError, match="out of range"):
        rows.read_rows([-1])
    bad = Path(shutil.copytree(outputs["float32"], tmp_path / "bad"))
    np.save(bad / "neighbours-00001.offsets.npy", np.arange(10, dtype=np.int64))
    with pytest.raises(RetrievalError, match="9 record offsets where the shard has 64 records"):
        NeighbourRows(bad).read_rows([70])


def run_processes(memory, out, process_count: int, stop: tuple[int, int] | None = None, timeout: float = 60):
    """The precompute as `process_count` processes (tests/threaded_processes.py). stop=(p, n): process
    p dies after writing n shards (the others then time out at the barrier, as a job's hosts do when
    one is lost). Returns (results, [(process, shard)] written)."""
    from threaded_processes import run_as_processes

    written: list[tuple[int, str]] = []

    def process(p: int, barrier) -> Any:
        def after_shard(name: str) -> None:
            written.append((p, name))
            if stop is not None and stop[0] == p and sum(q == p for q, _ in written) == stop[1]:
                raise Interrupted
        return run(memory, out, process_index=p, process_count=process_count, barrier=barrier,
                   after_shard=after_shard)

    results = run_as_processes(process, process_count, timeout=timeout, expected=(Interrupted,), join_timeout=120)
    return results, written


@pytest.mark.parametrize("process_count", [2, 3])
def test_processes_sharing_the_work_write_the_one_process_files(memory, outputs, tmp_path, process_count):
    """Each process writes its shards (i % count == index); then process 0 writes the manifest."""
    out = tmp_path / "out"
    results, written = run_processes(memory, out, process_count)
    assert all(r == precompute_mod.load_manifest(outputs["float32"]) for r in results)
    assert sorted(written) == sorted((i % process_count, f"neighbours-{i:05d}.tfrecord") for i in range(4))
    assert snapshot(out) == snapshot(outputs["float32"])  # the same bytes, manifest included


def test_a_killed_multi_process_run_resumes_to_the_same_files(memory, outputs, tmp_path):
    out = tmp_path / "out"
    results, written = run_processes(memory, out, 2, stop=(1, 1), timeout=3)  # process 1 dies after shard 1
    assert isinstance(results[1], Interrupted) and isinstance(results[0], TimeoutError)
    assert not (out / "manifest.json").exists()
    assert sorted(written) == [(0, "neighbours-00000.tfrecord"), (0, "neighbours-00002.tfrecord"),
                               (1, "neighbours-00001.tfrecord")]
    results, written = run_processes(memory, out, 2)  # the same command again
    assert written == [(1, "neighbours-00003.tfrecord")]  # only the missing shard is computed
    assert all(r == precompute_mod.load_manifest(outputs["float32"]) for r in results)
    assert snapshot(out) == snapshot(outputs["float32"])


def test_process_arguments_are_checked(memory, tmp_path):
    with pytest.raises(RetrievalError, match="needs a barrier"):
        run(memory, tmp_path / "a", process_index=0, process_count=2)
    with pytest.raises(RetrievalError, match="process_index=2"):
        run(memory, tmp_path / "b", process_index=2, process_count=2, barrier=lambda name: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
