"""Tests for retrieval.memory_store: sharded, atomic, resumable, memory-mapped embedding memory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrieval.memory_store import (
    Manifest,
    MemoryStore,
    MemoryStoreError,
    MemoryWriter,
)

DIM = 8
FP = "enc-test-v1"
PAYLOAD_SPEC = {"label": ((), "int32"), "box": ((4,), "float32")}


def _unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.permutation(10 * n)[:n].astype(np.int64) + 1000
    emb = {"image": _unit(rng, n), "text": _unit(rng, n)}
    payload = {
        "label": rng.integers(0, 100, size=n).astype(np.int32),
        "box": rng.random((n, 4)).astype(np.float32),
    }
    return ids, emb, payload


def _batches(ids, emb, payload, start, stop, bs):
    for i in range(start, stop, bs):
        j = min(i + bs, stop)
        yield ids[i:j], {k: v[i:j] for k, v in emb.items()}, {k: v[i:j] for k, v in payload.items()}


def _writer(directory, **kw):
    kw.setdefault("encoder_fingerprint", FP)
    kw.setdefault("dim", DIM)
    kw.setdefault("shard_size", 16)
    kw.setdefault("payload_spec", PAYLOAD_SPEC)
    return MemoryWriter(directory, **kw)


def _write_all(directory, data, bs=7, **kw) -> Manifest:
    ids, emb, payload = data
    w = _writer(directory, **kw)
    for b in _batches(ids, emb, payload, 0, len(ids), bs):
        w.add(*b)
    return w.close()


def _shard_dirs(directory) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith("shard-"))


@pytest.fixture
def small_store(tmp_path):
    data = _data(40)
    _write_all(tmp_path / "mem", data)
    return tmp_path / "mem", data


# ---------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip(tmp_path, dtype):
    n = 50  # shard_size 16 does not divide 50 -> 16, 16, 16, 2
    ids, emb, payload = _data(n)
    m = _write_all(tmp_path / "mem", (ids, emb, payload), bs=7, dtype=dtype)
    assert m.count == n and m.dtype == dtype
    assert [s.count for s in m.shards] == [16, 16, 16, 2]
    assert _shard_dirs(tmp_path / "mem") == [f"shard-{i:05d}" for i in range(4)]

    store = MemoryStore.open(tmp_path / "mem")
    assert store.count == n and store.dim == DIM and len(store) == n
    assert store.manifest == m
    np.testing.assert_array_equal(store.ids(), ids)
    assert store.ids().dtype == np.int64
    for mod in ("image", "text"):
        got = store.embeddings(mod)
        assert got.dtype == np.float32 and got.shape == (n, DIM)
        np.testing.assert_array_equal(got, emb[mod].astype(dtype).astype(np.float32))
        assert all(a.dtype == np.dtype(dtype) for a in store.shard_arrays(mod))
    for name in payload:
        np.testing.assert_array_equal(store.payload(name), payload[name])
        assert store.payload(name).dtype == payload[name].dtype


def test_shard_arrays_are_memory_mapped(small_store):
    directory, (ids, emb, _) = small_store
    store = MemoryStore.open(directory)
    arrays = store.shard_arrays("image")
    assert len(arrays) == 3
    assert all(isinstance(a, np.memmap) for a in arrays)
    seen_ids, rows = [], []
    for sid, semb in store.iter_shards("text"):
        assert isinstance(semb, np.memmap)
        seen_ids.append(sid)
        rows.append(np.asarray(semb))
    np.testing.assert_array_equal(np.concatenate(seen_ids), ids)
    np.testing.assert_array_equal(np.concatenate(rows), emb["text"])


def test_no_payload_and_custom_modalities(tmp_path):
    rng = np.random.default_rng(3)
    w = MemoryWriter(tmp_path / "m", encoder_fingerprint=FP, dim=DIM, modalities=("text",), shard_size=4)
    w.add(np.arange(10), {"text": _unit(rng, 10)})
    m = w.close()
    store = MemoryStore.open(tmp_path / "m")
    assert m.modalities == ("text",) and store.count == 10
    with pytest.raises(MemoryStoreError, match="'image' is not in this memory"):
        store.embeddings("image")
    with pytest.raises(MemoryStoreError, match="'label' is not in this memory"):
        store.payload("label")


# ---------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("k", [0, 1, 2])
def test_interrupted_write_resumes_identically(tmp_path, k):
    n, shard = 45, 16
    data = _data(n, seed=5)
    ids, emb, payload = data
    ref = _write_all(tmp_path / "ref", data, bs=5)

    d = tmp_path / "resumed"
    w = _writer(d)
    # Feed enough rows for exactly k complete shards plus some buffered rows, then "crash".
    fed = min(k * shard + 5, n)
    for b in _batches(ids, emb, payload, 0, fed, 3):
        w.add(*b)
    del w  # dropped without close: buffered rows are lost, complete shards stay
    assert _shard_dirs(d) == [f"shard-{i:05d}" for i in range(k)]
    assert not (d / "manifest.json").exists()
    leftover = d / ".tmp-shard-00009-deadbeef"
    leftover.mkdir()
    (leftover / "ids.npy").write_bytes(b"partial garbage")

    w2 = _writer(d)
    assert w2.num_written == k * shard
    assert not leftover.exists()
    for b in _batches(ids, emb, payload, w2.num_written, n, 11):
        w2.add(*b)
    m = w2.close()

    assert m == ref
    assert m.fingerprint() == ref.fingerprint()
    assert [s.sha256 for s in m.shards] == [s.sha256 for s in ref.shards]
    assert (d / "manifest.json").read_text() == (tmp_path / "ref" / "manifest.json").read_text()
    store = MemoryStore.open(d)
    np.testing.assert_array_equal(store.ids(), ids)


def test_resume_drops_trailing_partial_shard(tmp_path):
    # close() crashed after writing the last partial shard but before the manifest.
    data = _data(20)
    ref = _write_all(tmp_path / "ref", data)
    d = tmp_path / "m"
    _write_all(d, data)
    (d / "manifest.json").unlink()
    w = _writer(d)
    assert w.num_written == 16
    assert _shard_dirs(d) == ["shard-00000"]
    ids, emb, payload = data
    for b in _batches(ids, emb, payload, w.num_written, 20, 7):
        w.add(*b)
    assert w.close() == ref


def test_resume_rejects_ids_already_stored(tmp_path):
    data = _data(40)
    ids, emb, payload = data
    d = tmp_path / "m"
    w = _writer(d)
    for b in _batches(ids, emb, payload, 0, 20, 10):
        w.add(*b)
    del w
    w2 = _writer(d)
    with pytest.raises(MemoryStoreError, match=f"duplicate id {ids[0]}"):
        w2.add(*next(_batches(ids, emb, payload, 0, 2, 2)))


# ---------------------------------------------------------------------------------- bad input at add


def _fresh(tmp_path):
    w = _writer(tmp_path / "m")
    ids, emb, payload = _data(20)
    return w, ids, emb, payload


def _assert_nothing_partial(tmp_path, n_complete=0):
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == sorted(["writer.json"] + [f"shard-{i:05d}" for i in range(n_complete)])


def test_dimension_mismatch(tmp_path):
    w, ids, emb, payload = _fresh(tmp_path)
    emb["text"] = _unit(np.random.default_rng(0), 20, DIM + 1)
    with pytest.raises(MemoryStoreError, match=r"embeddings\['text'\].*dim=8"):
        w.add(ids, emb, payload)
    _assert_nothing_partial(tmp_path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(tmp_path, bad):
    w, ids, emb, payload = _fresh(tmp_path)
    w.add(ids[:16], {k: v[:16] for k, v in emb.items()}, {k: v[:16] for k, v in payload.items()})
    emb["image"] = emb["image"].copy()
    emb["image"][18, 3] = bad
    tail = slice(16, 20)
    with pytest.raises(MemoryStoreError, match=rf"embeddings\['image'\]: non-finite.*row 2 \(id {ids[18]}\)"):
        w.add(ids[tail], {k: v[tail] for k, v in emb.items()}, {k: v[tail] for k, v in payload.items()})
    # the complete shard stays; nothing partial written and the bad batch was not buffered
    _assert_nothing_partial(tmp_path, 1)
    assert w.count == 16


def test_non_unit_rows(tmp_path):
    w, ids, emb, payload = _fresh(tmp_path)
    emb["text"] = emb["text"].copy()
    emb["text"][5] *= 1.01
    with pytest.raises(MemoryStoreError, match=rf"embeddings\['text'\]: row 5 \(id {ids[5]}\) has L2 norm"):
        w.add(ids, emb, payload)
    _assert_nothing_partial(tmp_path)


def test_unit_within_tolerance_accepted(tmp_path):
    w, ids, emb, payload = _fresh(tmp_path)
    emb["text"] = emb["text"] * np.float32(1 + 5e-4)
    w.add(ids, emb, payload)
    assert w.close().count == 20


def test_wrong_modality_set(tmp_path):
    w, ids, emb, payload = _fresh(tmp_path)
    with pytest.raises(MemoryStoreError, match="modality set"):
        w.add(ids, {"image": emb["image"]}, payload)
    with pytest.raises(MemoryStoreError, match="modality set"):
        w.add(ids, {**emb, "audio": emb["text"]}, payload)
    _assert_nothing_partial(tmp_path)


def test_duplicate_ids_within_batch(tmp_path):
    w, ids, emb, payload = _fresh(tmp_path)
    ids = ids.copy()
    ids[7] = ids[3]
    with pytest.raises(MemoryStoreError, match=f"duplicate id {ids[3]}"):
        w.add(ids, emb, payload)
    _assert_nothing_partial(tmp_path)


def test_duplicate_ids_across_batches(tmp_path):
    w, ids, emb, payload = _fresh(tmp_path)
    w.add(ids[:5], {k: v[:5] for k, v in emb.items()}, {k: v[:5] for k, v in payload.items()})
    with pytest.raises(MemoryStoreError, match=f"duplicate id {ids[4]}"):
        w.add(ids[4:6], {k: v[4:6] for k, v in emb.items()}, {k: v[4:6] for k, v in payload.items()})


def test_inconsistent_batch_size_and_bad_ids(tmp_path):
    w, ids, emb, payload = _fresh(tmp_path)
    with pytest.raises(MemoryStoreError, match=r"embeddings\['image'\]: batch size 20 != 19"):
        w.add(ids[:19], emb, payload)
    with pytest.raises(MemoryStoreError, match=r"payload\['box'\]: expected shape"):
        w.add(ids, emb, {**payload, "box": payload["box"][:3]})
    with pytest.raises(MemoryStoreError, match="ids: expected an integer"):
        w.add(ids.astype(np.float64), emb, payload)
    with pytest.raises(MemoryStoreError, match="payload: names"):
        w.add(ids, emb, None)
    _assert_nothing_partial(tmp_path)


def test_empty_memory(tmp_path):
    w = _writer(tmp_path / "m")
    w.close()
    with pytest.raises(MemoryStoreError, match="empty memory"):
        MemoryStore.open(tmp_path / "m")


# ---------------------------------------------------------------------------------- bad on-disk state


def test_missing_shard(small_store):
    import shutil

    directory, _ = small_store
    shutil.rmtree(directory / "shard-00001")
    with pytest.raises(MemoryStoreError, match="shard-00001.*missing"):
        MemoryStore.open(directory)


def test_missing_shard_file(small_store):
    directory, _ = small_store
    (directory / "shard-00002" / "emb-text.npy").unlink()
    with pytest.raises(MemoryStoreError, match="emb-text.npy.*missing"):
        MemoryStore.open(directory, verify=False)


def test_corrupt_shard(small_store):
    directory, _ = small_store
    f = directory / "shard-00001" / "emb-image.npy"
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.raises(MemoryStoreError, match="shard-00001 is corrupt"):
        MemoryStore.open(directory)
    # without verification the flipped byte is not detected, but the store still opens
    assert MemoryStore.open(directory, verify=False).count == 40


def test_missing_manifest(small_store):
    directory, _ = small_store
    (directory / "manifest.json").unlink()
    with pytest.raises(MemoryStoreError, match="manifest.json: missing"):
        MemoryStore.open(directory)


def test_corrupt_manifest(small_store):
    directory, _ = small_store
    p = directory / "manifest.json"
    p.write_text(p.read_text()[:-20])
    with pytest.raises(MemoryStoreError, match="manifest.json: corrupt JSON"):
        MemoryStore.open(directory)


def test_manifest_inconsistent_count(small_store):
    directory, _ = small_store
    p = directory / "manifest.json"
    d = json.loads(p.read_text())
    d["count"] = 41
    p.write_text(json.dumps(d))
    with pytest.raises(MemoryStoreError, match="manifest.json: field 'count' is 41 but the shards hold 40"):
        MemoryStore.open(directory)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"dim": DIM * 2}, "dim"),
        ({"dtype": "float16"}, "dtype"),
        ({"modalities": ("text", "image")}, "modalities"),
        ({"encoder_fingerprint": "other"}, "encoder_fingerprint"),
        ({"shard_size": 8}, "shard_size"),
    ],
)
def test_resume_with_different_settings(tmp_path, change, field):
    ids, emb, payload = _data(20)
    w = _writer(tmp_path / "m")
    w.add(ids, emb, payload)
    del w
    with pytest.raises(MemoryStoreError, match=rf"writer.json: .*different settings.*{field}"):
        _writer(tmp_path / "m", **change)


def test_shards_without_writer_json(tmp_path):
    ids, emb, payload = _data(20)
    w = _writer(tmp_path / "m")
    w.add(ids, emb, payload)
    del w
    (tmp_path / "m" / "writer.json").unlink()
    with pytest.raises(MemoryStoreError, match="writer.json: missing"):
        _writer(tmp_path / "m")


def test_writing_into_finished_memory(small_store):
    directory, data = small_store
    before = MemoryStore.open(directory).manifest
    with pytest.raises(MemoryStoreError, match="already finished.*overwrite=True"):
        _writer(directory)
    assert MemoryStore.open(directory).manifest == before
    # overwrite=True rewrites it from scratch
    ids, emb, payload = _data(20, seed=9)
    w = _writer(directory, overwrite=True)
    assert w.num_written == 0
    w.add(ids, emb, payload)
    m = w.close()
    assert m.count == 20 and _shard_dirs(directory) == ["shard-00000", "shard-00001"]
    np.testing.assert_array_equal(MemoryStore.open(directory).ids(), ids)


def test_add_after_close(tmp_path):
    w, ids, emb, payload = _fresh(tmp_path)
    w.add(ids, emb, payload)
    w.close()
    with pytest.raises(MemoryStoreError, match="writer is closed"):
        w.add(ids, emb, payload)


# ---------------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_sensitive(tmp_path):
    data = _data(40)
    m1 = _write_all(tmp_path / "a", data)
    fp = m1.fingerprint()
    assert len(fp) == 64
    assert MemoryStore.open(tmp_path / "a").manifest.fingerprint() == fp
    assert MemoryStore.open(tmp_path / "a").fingerprint() == fp
    # same input in different batch sizes -> same memory
    assert _write_all(tmp_path / "b", data, bs=13).fingerprint() == fp

    ids, emb, payload = data
    emb2 = {k: v.copy() for k, v in emb.items()}
    emb2["text"][33] = emb2["text"][33][::-1].copy()  # one changed row (still unit norm)
    m3 = _write_all(tmp_path / "c", (ids, emb2, payload))
    assert m3.fingerprint() != fp
    changed = [i for i, (x, y) in enumerate(zip(m1.shards, m3.shards)) if x.sha256 != y.sha256]
    assert changed == [2]

    # other encoder -> other memory even with identical embeddings
    assert _write_all(tmp_path / "d", data, encoder_fingerprint="enc-2").fingerprint() != fp
    # float16 storage -> other memory
    assert _write_all(tmp_path / "e", data, dtype="float16").fingerprint() != fp
