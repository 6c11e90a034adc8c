"""Tests for retrieval/backends.py: exactness, default-setting recall, sharding, persistence,
exclusion and input validation of every kNN backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from retrieval.backends import (
    KINDS,
    ExactIndex,
    FaissIndex,
    Index,
    JaxIndex,
    RetrievalError,
    make_index,
    recall_at_k,
    search_excluding,
)

REPO = str(Path(__file__).resolve().parents[1])
EXACT_KINDS = ["exact", "faiss_flat", "jax_exact"]
APPROX_KINDS = ["faiss_ivf_flat", "faiss_ivf_pq", "faiss_hnsw", "scann", "jax_approx"]


def clustered(n: int, d: int, n_centres: int, n_queries: int, seed: int = 0, noise: float = 0.5):
    """Gaussian clusters on the sphere: points = centre + noise, L2-normalised; queries are
    other noisy points from the same centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_centres, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def points(m):
        lab = rng.integers(0, n_centres, m)
        x = centres[lab] + noise * rng.standard_normal((m, d)).astype(np.float32) / np.sqrt(d)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return points(n), points(n_queries)


def numpy_topk(mem, q, k, ids=None):
    scores = q.astype(np.float64) @ mem.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    ids = np.arange(len(mem)) if ids is None else ids
    return np.take_along_axis(scores, order, axis=1), ids[order]


@pytest.fixture(scope="module")
def small():
    mem, q = clustered(5000, 64, 50, 300, seed=1)
    ids = np.random.default_rng(7).permutation(100_000)[:5000].astype(np.int64)
    return mem, q, ids


@pytest.fixture(scope="module")
def big():
    mem, q = clustered(50_000, 128, 500, 300, seed=0)
    _, exact_ids = numpy_topk(mem, q, 10)
    return mem, q, exact_ids


@pytest.fixture(scope="module")
def big_indexes(big):
    mem, _, _ = big
    return {kind: make_index(kind).build(mem) for kind in APPROX_KINDS}


# ------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_exact_backends_match_numpy(kind, small):
    mem, q, ids = small
    ref_s, ref_i = numpy_topk(mem, q, 20, ids)
    scores, got = make_index(kind).build(mem, ids).search(q, 20)
    assert scores.dtype == np.float32 and got.dtype == np.int64 and got.shape == (300, 20)
    np.testing.assert_array_equal(got, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_exact_blocked_merge_and_tie_break():
    # Blocks smaller than n force the running top-k merge; duplicated rows force ties. Dyadic
    # entries make every dot product exact in float32, so tied scores are bit-identical.
    rng = np.random.default_rng(3)
    base = (rng.integers(-3, 4, (300, 16)) / 4).astype(np.float32)
    mem = np.concatenate([base, base])  # every score appears twice
    ids = np.concatenate([np.arange(300, 600), np.arange(300)]).astype(np.int64)
    idx = ExactIndex(block_rows=77, block_queries=13).build(mem, ids)
    s, got = idx.search(base[:40], 6)
    ref_scores = base[:40].astype(np.float64) @ mem.T.astype(np.float64)
    for r in range(40):
        order = np.lexsort((ids, -ref_scores[r]))[:6]
        np.testing.assert_array_equal(got[r], ids[order])
        np.testing.assert_array_equal(s[r], ref_scores[r, order])
        for c in range(0, 6, 2):  # tied pairs always ordered by lower id
            assert s[r, c] == s[r, c + 1] and got[r, c] < got[r, c + 1]


def test_add_matches_single_build(small):
    mem, q, ids = small
    for kind in ["exact", "faiss_flat", "faiss_ivf_flat", "faiss_hnsw", "jax_exact"]:
        full = make_index(kind).build(mem, ids)
        part = make_index(kind).build(mem[:3000], ids[:3000])
        part.add(mem[3000:], ids[3000:])
        assert part.ntotal == 5000
        r_full = full.search(q, 10)[1]
        r_part = part.search(q, 10)[1]
        assert recall_at_k(r_part, r_full, 10) >= 0.95, kind
    # scann's add rebuilds; result must include the added rows
    sc = make_index("scann").build(mem[:3000], ids[:3000])
    sc.add(mem[3000:], ids[3000:])
    np.testing.assert_array_equal(sc.search(mem[4000:4005], 1)[1][:, 0], ids[4000:4005])


# ---------------------------------------------------------------------------------- recall


def test_approx_backends_recall_with_defaults(big, big_indexes):
    _, q, exact_ids = big
    recalls = {}
    for kind, idx in big_indexes.items():
        scores, got = idx.search(q, 10)
        assert got.shape == (len(q), 10)
        assert (np.diff(scores, axis=1) <= 1e-6).all(), kind
        recalls[kind] = recall_at_k(got, exact_ids, 10)
    print("\nrecall@10 (50k x 128, defaults):", json.dumps(recalls))
    for kind, r in recalls.items():
        assert r >= 0.9, f"{kind} recall@10={r:.3f}"


def test_scann_tree_mode(big):
    mem, q, exact_ids = big
    idx = make_index("scann", mode="tree").build(mem[:20_000])
    _, ref = numpy_topk(mem[:20_000], q, 10)
    cfg = idx.config()
    assert cfg["resolved_mode"] == "tree" and cfg["params"]["num_leaves"] == 141
    r = recall_at_k(idx.search(q, 10)[1], ref, 10)
    print(f"\nscann tree recall@10 (20k): {r:.3f}")
    assert r >= 0.9


def test_recall_at_k_helper():
    a = np.array([[1, 2, 3], [4, 5, 6]])
    e = np.array([[3, 2, 9], [7, 8, 9]])
    assert recall_at_k(a, e, 3) == pytest.approx((2 / 3 + 0) / 2)
    assert recall_at_k(e, e, 2) == 1.0


# ------------------------------------------------------------------------- device sharding

_SHARD_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, jax
    sys.path.insert(0, sys.argv[1])
    from retrieval.backends import make_index
    out = {"devices": jax.device_count(), "cases": []}
    rng = np.random.default_rng(0)
    for n, d, k in [(5003, 32, 10), (21, 8, 10), (4096, 16, 5)]:
        mem = rng.standard_normal((n, d)).astype(np.float32)
        mem /= np.linalg.norm(mem, axis=1, keepdims=True)
        q = rng.standard_normal((37, d)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        ids = rng.permutation(10 * n)[:n].astype(np.int64)
        res = {}
        for kind in ["jax_exact", "jax_approx"]:
            s, i = make_index(kind, query_block=16).build(mem, ids).search(q, k)
            res[kind] = [s.tolist(), i.tolist()]
        out["cases"].append({"mem": mem.tolist(), "q": q.tolist(), "ids": ids.tolist(),
                             "k": k, "res": res})
    print(json.dumps(out))
""")


def test_jax_sharded_over_8_devices_matches_numpy():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SHARD_SCRIPT, REPO], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    for case in out["cases"]:
        mem = np.array(case["mem"], np.float32)
        q = np.array(case["q"], np.float32)
        ids = np.array(case["ids"], np.int64)
        k = case["k"]
        ref_s, ref_i = numpy_topk(mem, q, k, ids)
        one_dev = JaxIndex(query_block=16).build(mem, ids).search(q, k)  # this process: 1 device
        for kind in ["jax_exact", "jax_approx"]:
            s, i = (np.array(x) for x in case["res"][kind])
            np.testing.assert_array_equal(i, ref_i, err_msg=f"{kind} n={len(mem)}")
            np.testing.assert_array_equal(i, one_dev[1])
            np.testing.assert_allclose(s, ref_s, atol=1e-5)
            assert np.isfinite(s).all()  # padded rows never win


# ---------------------------------------------------------------------------- persistence


def _roundtrip(idx, q, tmp_path, name):
    before = idx.search(q, 10)
    d = str(tmp_path / name)
    idx.save(d, "memory-v1")
    loaded = Index.load(d, "memory-v1")
    assert type(loaded) is type(idx) and loaded.name == idx.name
    assert loaded.config() == idx.config()
    after = loaded.search(q, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)
    assert idx.size_bytes() > 0
    with pytest.raises(RetrievalError, match="another memory"):
        type(idx).load(d, "memory-v2")


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_save_load_exact(kind, small, tmp_path):
    mem, q, ids = small
    _roundtrip(make_index(kind).build(mem, ids), q, tmp_path, kind)


@pytest.mark.parametrize("kind", APPROX_KINDS)
def test_save_load_approx(kind, big, big_indexes, tmp_path):
    _roundtrip(big_indexes[kind], big[1][:100], tmp_path, kind)


def test_save_load_scann_tree_and_size(small, tmp_path):
    mem, q, ids = small
    idx = make_index("scann", mode="tree").build(mem, ids)
    _roundtrip(idx, q, tmp_path, "scann_tree")
    flat = make_index("faiss_flat").build(mem, ids)
    assert flat.size_bytes() >= mem.nbytes  # flat stores the raw vectors


# ------------------------------------------------------------------------------- exclusion


@pytest.mark.parametrize("kind", ["exact", "faiss_hnsw", "jax_exact"])
def test_search_excluding(kind, small):
    mem, _, ids = small
    dup_of = 10
    mem2 = np.concatenate([mem, mem[dup_of:dup_of + 1]])  # planted exact duplicate of row 10
    ids2 = np.concatenate([ids, [999_999]]).astype(np.int64)
    idx = make_index(kind).build(mem2, ids2)
    rows = np.arange(0, 40)
    q = mem[rows]
    s, got = search_excluding(idx, q, 10, exclude_ids=ids[rows], duplicate_threshold=0.99)
    assert got.shape == (40, 10) and s.shape == (40, 10)
    assert not (got == ids[rows][:, None]).any()  # own id never returned
    assert (s <= 0.99).all()
    assert 999_999 not in got[dup_of]  # the duplicate (score ~ 1) is dropped
    # without exclusion the query's own id and the duplicate would come first
    _, raw = idx.search(mem[dup_of:dup_of + 1], 2)
    assert set(raw[0]) == {ids[dup_of], 999_999}
    # what remains is the exact ranking minus the excluded entries
    ref_s, ref_i = numpy_topk(mem2, q, 14, ids2)
    for r in range(40):
        keep = (ref_i[r] != ids[r]) & (ref_s[r] <= 0.99)
        if kind != "faiss_hnsw":
            np.testing.assert_array_equal(got[r], ref_i[r][keep][:10])
    # exclude_ids only: exactly k, own id gone
    s2, got2 = search_excluding(idx, q, 5, exclude_ids=ids[rows])
    assert got2.shape == (40, 5) and not (got2 == ids[rows][:, None]).any()


def test_search_excluding_not_enough():
    mem = np.eye(8, dtype=np.float32)
    idx = make_index("exact").build(mem)
    with pytest.raises(RetrievalError, match="not enough results"):
        search_excluding(idx, mem[:2], 7, exclude_ids=np.array([0, 1]),
                         duplicate_threshold=-0.5)


# ------------------------------------------------------------------------------ validation


def test_bad_inputs_raise(small):
    mem, q, ids = small
    bad = mem.copy()
    bad[3, 5] = np.nan
    infq = q[:2].copy()
    infq[0, 0] = np.inf
    with pytest.raises(RetrievalError, match="unknown index kind.*exact"):
        make_index("annoy")
    for kind in KINDS:
        with pytest.raises(RetrievalError, match="search before build"):
            make_index(kind).search(q, 5)
    with pytest.raises(RetrievalError, match="empty"):
        make_index("exact").build(np.zeros((0, 64), np.float32))
    for kind in ["exact", "faiss_flat", "scann", "jax_exact"]:
        with pytest.raises(RetrievalError, match="NaN or inf"):
            make_index(kind).build(bad)
        idx = make_index(kind).build(mem[:500], ids[:500])
        with pytest.raises(RetrievalError, match="dimension mismatch"):
            idx.search(q[:, :32], 5)
        with pytest.raises(RetrievalError, match="k=501 > memory size 500"):
            idx.search(q, 501)
        with pytest.raises(RetrievalError, match="NaN or inf"):
            idx.search(infq, 5)
        with pytest.raises(RetrievalError, match="dimension mismatch"):
            idx.add(mem[:3, :10], np.array([1, 2, 3]))
        with pytest.raises(RetrievalError, match="not unique"):
            idx.add(mem[:2], ids[:2])  # ids already in the index
    dup = ids[:500].copy()
    dup[1] = dup[0]
    with pytest.raises(RetrievalError, match="not unique"):
        make_index("exact").build(mem[:500], dup)
    with pytest.raises(RetrievalError, match="wrong length"):
        make_index("faiss_flat").build(mem[:500], ids[:499])
    with pytest.raises(RetrievalError, match="2-D"):
        make_index("exact").build(mem[0])
    with pytest.raises(RetrievalError, match="k must be >= 1"):
        make_index("exact").build(mem[:10]).search(q, 0)
    with pytest.raises(RetrievalError, match="bad parameters"):
        make_index("faiss_hnsw", bogus=1)
    with pytest.raises(RetrievalError, match="no saved index"):
        Index.load("/nonexistent/dir", "x")
    assert issubclass(RetrievalError, ValueError)
    assert isinstance(make_index("faiss_ivf_pq"), FaissIndex)
