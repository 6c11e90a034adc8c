"""Tests for retrieval/backends/ and retrieval/topk.py: exactness, default-setting recall, search-time
parameters, sharding, persistence, exclusion and input validation of every kNN backend."""

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
from retrieval.topk import top_k_rows

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


def sorted_topk(scores, ids, k):
    """Top-k of one row by Python's sort of (-score, id) pairs: the tie rule spelled out."""
    pairs = sorted(zip((-scores.astype(np.float64)).tolist(), ids.tolist()))[:k]
    return np.array([-s for s, _ in pairs], np.float32), np.array([i for _, i in pairs], np.int64)


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

def test_exact_ties_of_duplicate_vectors_do_not_depend_on_their_position():
    # Real-valued unit vectors (not dyadic): a float32 BLAS product rounds identical columns
    # differently depending on where they sit (~6% of such ties on some CPUs); the oracle must not.
    rng = np.random.default_rng(11)
    mem = rng.standard_normal((2000, 384)).astype(np.float32)
    mem /= np.linalg.norm(mem, axis=1, keepdims=True)
    perm = rng.permutation(2000)
    src, dst = perm[:200], perm[200:400]
    mem[dst] = mem[src]
    q = mem[rng.integers(0, 2000, 150)] + 0.05 * rng.standard_normal((150, 384)).astype(np.float32)
    ids = rng.permutation(10 * 2000)[:2000].astype(np.int64)  # ids unrelated to positions
    scores, got = ExactIndex(block_rows=500, block_queries=64).build(mem, ids).search(q, 2000)
    ref = (q.astype(np.float64) @ mem.T.astype(np.float64)).astype(np.float32)
    for r in range(len(q)):
        order = np.lexsort((ids, -ref[r]))  # descending score, ties by lower id
        np.testing.assert_array_equal(got[r], ids[order])
        np.testing.assert_array_equal(scores[r], ref[r, order])
    position = {int(i): p for p, i in enumerate(ids)}
    col = np.array([[position[int(i)] for i in row] for row in got])
    tied = (ref[np.arange(len(q))[:, None], col[:, :-1]] == ref[np.arange(len(q))[:, None], col[:, 1:]])
    assert tied.sum() >= 150 * 200  # every duplicate pair is an exact tie in every row


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_add_to_exact_backend_equals_one_build_over_the_union(kind, small):
    # ids and scores of build(part) + add(rest) must be those of build(all): same rows, same order
    mem, q, ids = small
    full_s, full_i = make_index(kind).build(mem, ids).search(q, 20)
    part = make_index(kind).build(mem[:3000], ids[:3000]).add(mem[3000:4200], ids[3000:4200])
    part.add(mem[4200:], ids[4200:])
    assert part.ntotal == 5000
    part_s, part_i = part.search(q, 20)
    np.testing.assert_array_equal(part_i, full_i)
    np.testing.assert_allclose(part_s, full_s, atol=1e-6)
    ref_s, ref_i = numpy_topk(mem, q, 20, ids)  # and both are the exact answer
    np.testing.assert_array_equal(part_i, ref_i)


def test_add_to_approximate_backends(small):
    mem, q, ids = small
    _, ref = numpy_topk(mem, q, 10, ids)
    for kind in ["faiss_ivf_flat", "faiss_hnsw"]:  # incremental: trained on the first part only
        part = make_index(kind).build(mem[:3000], ids[:3000]).add(mem[3000:], ids[3000:])
        assert part.ntotal == 5000
        assert recall_at_k(part.search(q, 10)[1], ref, 10) >= 0.95, kind
    # scann's add rebuilds; result must include the added rows
    sc = make_index("scann").build(mem[:3000], ids[:3000])
    sc.add(mem[3000:], ids[3000:])
    np.testing.assert_array_equal(sc.search(mem[4000:4005], 1)[1][:, 0], ids[4000:4005])


@pytest.mark.parametrize("per_row_ids", [False, True])
def test_top_k_rows_matches_a_sort_with_ties_by_lower_id(per_row_ids):
    # scores from 5 values: most rows have more ties at the k-th score than places left
    rng = np.random.default_rng(11)
    for m, k in [(30, 1), (30, 7), (30, 30), (200, 13), (5, 5)]:
        scores = rng.integers(-2, 3, (9, m)).astype(np.float32)
        scores[0] = 1.0  # a row of one score: the k lowest ids win
        scores[1, : m // 2] = -np.inf  # padding loses to every real score
        ids = rng.permutation(10 * m)[:m] if not per_row_ids else \
            np.stack([rng.permutation(10 * m)[:m] for _ in range(9)])
        got_s, got_i = top_k_rows(scores, ids, k)
        assert got_s.shape == got_i.shape == (9, k) and got_i.dtype == np.int64
        for r in range(9):
            exp_s, exp_i = sorted_topk(scores[r], ids[r] if per_row_ids else ids, k)
            np.testing.assert_array_equal(got_i[r], exp_i, err_msg=f"m={m} k={k} row {r}")
            np.testing.assert_array_equal(got_s[r], exp_s)


def test_top_k_rows_bad_input():
    scores = np.zeros((2, 4), np.float32)
    with pytest.raises(RetrievalError, match="k=5 but the rows have only 4 columns"):
        top_k_rows(scores, np.arange(4), 5)
    with pytest.raises(RetrievalError, match="ids of shape"):
        top_k_rows(scores, np.arange(3), 2)
    with pytest.raises(RetrievalError, match="NaN"):
        top_k_rows(np.array([[0.0, np.nan]]), np.arange(2), 1)
    with pytest.raises(RetrievalError, match="2-D"):
        top_k_rows(np.zeros(4), np.arange(4), 1)
    with pytest.raises(RetrievalError, match="k must be >= 1"):
        top_k_rows(scores, np.arange(4), 0)


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
            idx = make_index(kind, query_block=16).build(mem, ids)
            s, i = idx.search(q, k)
            res[kind] = [s.tolist(), i.tolist()]
        out["cases"].append({"mem": mem.tolist(), "q": q.tolist(), "ids": ids.tolist(), "k": k,
                             "recall_target": idx.config()["params"]["recall_target"], "res": res})
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
        s, i = (np.array(x) for x in case["res"]["jax_exact"])
        np.testing.assert_array_equal(i, ref_i, err_msg=f"jax_exact n={len(mem)}")
        np.testing.assert_array_equal(i, one_dev[1])
        np.testing.assert_allclose(s, ref_s, atol=1e-5)
        assert np.isfinite(s).all()  # padded rows never win
        # approx_max_k promises recall_target, not exactness (it is exact only on CPU)
        s, i = (np.array(x) for x in case["res"]["jax_approx"])
        assert recall_at_k(i, ref_i, k) >= case["recall_target"], f"jax_approx n={len(mem)}"
        assert np.isfinite(s).all() and (np.diff(s, axis=1) <= 0).all()
        row_of = {int(x): r for r, x in enumerate(ids)}  # every score is its id's true score
        true = np.einsum("qd,qkd->qk", q, mem[np.vectorize(row_of.get)(i)])
        np.testing.assert_allclose(s, true, atol=1e-5)


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


# ---------------------------------------------------------------------- search parameters


def test_ivf_nprobe_all_lists_is_exact_and_one_list_is_not(small):
    mem, q, ids = small
    _, ref = numpy_topk(mem, q, 10, ids)
    idx = make_index("faiss_ivf_flat", nlist=64).build(mem, ids)
    assert idx.search_params() == {"nprobe": 8}  # the default, nlist // 8
    idx.set_search_params(nprobe=64)  # every list: exhaustive
    assert idx.search_params() == {"nprobe": 64} and idx.config()["params"]["nprobe"] == 64
    np.testing.assert_array_equal(idx.search(q, 10)[1], ref)
    recalls = {p: recall_at_k(idx.set_search_params(nprobe=p).search(q, 10)[1], ref, 10)
               for p in (1, 2, 64)}  # one index, no rebuild
    assert recalls[1] < recalls[2] <= recalls[64] == 1.0, recalls


def test_ivf_pq_k_factor_reorders_more_candidates(small):
    mem, q, ids = small
    _, ref = numpy_topk(mem, q, 10, ids)
    idx = make_index("faiss_ivf_pq", nlist=32, pq_nbits=6).build(mem, ids)  # 6 bits: quick k-means
    recalls = []
    for f in (1, 2, 2.5, 64):  # 2.5: a fractional factor must not be truncated to 2
        idx.set_search_params(nprobe=32, k_factor=f)
        assert idx.search_params() == {"nprobe": 32, "k_factor": float(f)}
        recalls.append(recall_at_k(idx.search(q, 10)[1], ref, 10))
    assert recalls[0] < recalls[1] < recalls[2] < recalls[3] == 1.0, recalls


def test_hnsw_ef_search(small):
    mem, q, ids = small
    _, ref = numpy_topk(mem, q, 10, ids)
    idx = make_index("faiss_hnsw").build(mem, ids)
    recalls = {ef: recall_at_k(idx.set_search_params(ef_search=ef).search(q, 10)[1], ref, 10)
               for ef in (1, 16, 512)}
    assert recalls[1] < recalls[16] <= recalls[512] and recalls[512] >= 0.99, recalls
    assert idx.config()["params"]["ef_search"] == 512


def test_scann_leaves_to_search_and_reorder(small):
    mem, q, ids = small
    _, ref = numpy_topk(mem, q, 10, ids)
    idx = make_index("scann", mode="tree", num_leaves=50).build(mem, ids)
    assert idx.search_params() == {"num_leaves_to_search": 5, "reorder": 100}
    recalls = {}
    for leaves in (1, 50, 1):  # on one built searcher, back and forth
        idx.set_search_params(num_leaves_to_search=leaves)
        recalls.setdefault(leaves, []).append(recall_at_k(idx.search(q, 10)[1], ref, 10))
    assert recalls[1][0] == recalls[1][1] < recalls[50][0], recalls
    assert recalls[50][0] >= 0.95
    assert idx.config()["params"]["num_leaves_to_search"] == 1
    # reorder: how many AH candidates are rescored exactly (at least 4k = 40)
    few, many = (recall_at_k(idx.set_search_params(num_leaves_to_search=50, reorder=r).search(q, 10)[1],
                             ref, 10) for r in (1, 400))
    assert few < many == 1.0, (few, many)
    assert idx.config()["params"]["reorder"] == 400


@pytest.mark.parametrize("kind, params", [
    ("faiss_ivf_flat", {"nprobe": 1}),
    ("faiss_ivf_pq", {"nprobe": 2, "k_factor": 1.5}),
    ("faiss_hnsw", {"ef_search": 2}),
    ("scann", {"num_leaves_to_search": 1}),
    ("scann", {"reorder": 12}),
    ("jax_approx", {"recall_target": 0.5}),
])
def test_search_params_survive_save_and_load(kind, params, small, tmp_path):
    mem, q, ids = small
    build = {"faiss_ivf_flat": {"nlist": 64}, "faiss_ivf_pq": {"nlist": 64, "pq_nbits": 6},
             "scann": {"mode": "tree", "num_leaves": 50}}.get(kind, {})
    idx = make_index(kind, **build).build(mem, ids)
    defaults = idx.search(q, 10)[1]
    before = idx.set_search_params(**params).search(q, 10)[1]
    if kind != "jax_approx":  # on CPU approx_max_k is exact whatever the target
        assert not np.array_equal(before, defaults)  # so equal results below mean params kept
    idx.save(str(tmp_path / kind), "memory-v1")
    loaded = Index.load(str(tmp_path / kind), "memory-v1")
    assert loaded.search_params() == {**idx.search_params(), **params} == idx.search_params()
    assert loaded.config() == idx.config()
    np.testing.assert_array_equal(loaded.search(q, 10)[1], before)


def test_set_search_params_rejects_unknown_names_and_bad_values(small):
    mem, _, ids = small
    params = {"faiss_ivf_flat": {"nlist": 32}, "faiss_ivf_pq": {"nlist": 32, "pq_nbits": 6}}
    built = {kind: make_index(kind, **params.get(kind, {})).build(mem[:2000])
             for kind in ["exact", "faiss_flat", "faiss_ivf_flat", "faiss_ivf_pq", "faiss_hnsw",
                          "jax_exact", "jax_approx"]}
    built["scann"] = make_index("scann").build(mem[:2000])  # brute force at this n: no params
    built["scann_tree"] = make_index("scann", mode="tree", num_leaves=20).build(mem[:2000])
    accepted = {"exact": "none", "faiss_flat": "none", "faiss_ivf_flat": "nprobe",
                "faiss_ivf_pq": "nprobe, k_factor", "faiss_hnsw": "ef_search", "jax_exact": "none",
                "jax_approx": "recall_target", "scann": "none",
                "scann_tree": "num_leaves_to_search, reorder"}
    for key, idx in built.items():
        assert ", ".join(idx.search_params()) == (accepted[key] if accepted[key] != "none" else "")
        with pytest.raises(RetrievalError, match=f"no search parameter 'bogus'; accepted: {accepted[key]}$"):
            idx.set_search_params(bogus=1)
    ivf = built["faiss_ivf_flat"]
    with pytest.raises(RetrievalError, match="no search parameter 'ef_search'"):
        ivf.set_search_params(nprobe=2, ef_search=64)  # nothing applied when one name is bad
    with pytest.raises(RetrievalError, match="nprobe=33 > nlist=32"):
        ivf.set_search_params(nprobe=33)
    with pytest.raises(RetrievalError, match="nprobe must be >= 1"):
        ivf.set_search_params(nprobe=0)
    with pytest.raises(RetrievalError, match="nprobe must be an int"):
        ivf.set_search_params(nprobe=2.0)
    assert ivf.search_params() == {"nprobe": 4}
    with pytest.raises(RetrievalError, match="k_factor must be in"):
        built["faiss_ivf_pq"].set_search_params(k_factor=0.5)
    with pytest.raises(RetrievalError, match="recall_target must be in"):
        built["jax_approx"].set_search_params(recall_target=1.5)
    with pytest.raises(RetrievalError, match="num_leaves_to_search=21 > num_leaves=20"):
        built["scann_tree"].set_search_params(num_leaves_to_search=21)


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
