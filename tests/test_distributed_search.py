"""A memory split over shards, or over 2 processes, returns the same top-k as one piece; an index
built in pieces by several processes searches as the one-piece index."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from retrieval.backends import RetrievalError, make_index
from retrieval.distributed import ShardedIndex, build_sharded_index, merge_topk, piece_shards
from retrieval.memory_store import MemoryStore, MemoryWriter

REPO = Path(__file__).resolve().parents[1]


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def memory_and_queries(n=3000, d=32, q=60, seed=0):
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((20, d)))
    mem = unit(centres[rng.integers(0, 20, n)] + 0.3 * rng.standard_normal((n, d)))
    mem[1::97] = mem[0::97][: len(mem[1::97])]  # exact duplicates: ties must break by lower id
    queries = unit(centres[rng.integers(0, 20, q)] + 0.3 * rng.standard_normal((q, d)))
    return mem, queries


def brute_force(mem, ids, queries, k):
    # float64 products rounded to float32, as ExactIndex: duplicates then tie exactly (a float32
    # BLAS product may round identical columns differently by position)
    scores = (queries.astype(np.float64) @ mem.T.astype(np.float64)).astype(np.float32)
    order = np.lexsort((np.broadcast_to(ids, scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def sorted_topk(scores, ids, k):
    """Top-k of one row by Python's sort of (-score, id) pairs: the tie rule spelled out."""
    pairs = sorted(zip((-scores.astype(np.float64)).tolist(), ids.tolist()))[:k]
    return [-s for s, _ in pairs], [i for _, i in pairs]


def test_merge_topk_equals_a_sort_of_the_union_with_ties_by_lower_id():
    rng = np.random.default_rng(1)
    for trial in range(40):
        q, n_pieces = 6, int(rng.integers(1, 5))
        widths = rng.integers(1, 12, n_pieces)
        ids = rng.permutation(1000)[: widths.sum()].astype(np.int64)
        scores = rng.integers(-2, 3, (q, widths.sum())).astype(np.float32)  # many ties
        scores[0] = 0.5  # one row all tied: the k lowest ids of the union
        scores[1, ::3] = -np.inf  # padding of short pieces
        cuts = np.cumsum(widths)[:-1]
        k = int(rng.integers(1, widths.sum() + 1))
        got_s, got_i = merge_topk(np.split(scores, cuts, axis=1),
                                  np.split(np.broadcast_to(ids, scores.shape), cuts, axis=1), k)
        assert got_s.shape == got_i.shape == (q, k)
        assert got_s.dtype == np.float32 and got_i.dtype == np.int64
        for r in range(q):
            exp_s, exp_i = sorted_topk(scores[r], ids, k)
            assert got_i[r].tolist() == exp_i, f"trial {trial} row {r}"
            assert got_s[r].tolist() == exp_s


def test_merge_topk_bad_input():
    s, i = np.zeros((3, 4), np.float32), np.arange(12).reshape(3, 4)
    with pytest.raises(RetrievalError, match="k=9 but the pieces return only 8"):
        merge_topk([s, s], [i, i + 12], 9)
    with pytest.raises(RetrievalError, match="one \\(scores, ids\\) pair per piece"):
        merge_topk([s, s], [i], 2)
    with pytest.raises(RetrievalError, match="one \\(scores, ids\\) pair per piece"):
        merge_topk([], [], 2)
    with pytest.raises(RetrievalError, match="differ in shape"):
        merge_topk([s], [i[:, :3]], 2)
    with pytest.raises(RetrievalError, match="different numbers of queries"):
        merge_topk([s, s[:2]], [i, i[:2] + 12], 2)
    with pytest.raises(RetrievalError, match="NaN"):
        merge_topk([np.full((3, 4), np.nan, np.float32)], [i], 2)
    with pytest.raises(RetrievalError, match="ids must be integers"):
        merge_topk([s], [i.astype(np.float32)], 2)
    with pytest.raises(RetrievalError, match="k must be >= 1"):
        merge_topk([s], [i], 0)


def assert_same_topk(mem, ids, queries, got_ids, exp_ids, strict):
    """Exact search: identical ids. Float backends (BLAS blocking differs) may order exact
    duplicates differently: then every rank must hold an id with the expected true score."""
    if strict:
        np.testing.assert_array_equal(got_ids, exp_ids)
        return
    row_of = {int(i): r for r, i in enumerate(ids)}
    true = lambda id_array: np.einsum("qd,qkd->qk", queries, mem[np.vectorize(row_of.get)(id_array)])
    np.testing.assert_allclose(true(got_ids), true(exp_ids), atol=1e-6)
    assert all(len(set(r)) == len(r) for r in got_ids.tolist())


@pytest.mark.parametrize("kind", ["exact", "faiss_flat", "jax_exact"])
def test_memory_split_over_store_shards_equals_one_piece(tmp_path, kind):
    mem, queries = memory_and_queries()
    ids = np.arange(len(mem), dtype=np.int64) * 3 + 7  # ids unrelated to row positions
    with MemoryWriter(tmp_path / "m", encoder_fingerprint="test", dim=mem.shape[1], shard_size=700) as w:
        w.add(ids, {"image": mem, "text": mem})
    store = MemoryStore.open(tmp_path / "m")
    sharded = ShardedIndex.from_store(store, "image", kind)
    assert len(sharded.pieces) == 5 and sharded.ntotal == len(mem)
    scores, got = sharded.search(queries, 10)
    exp_s, exp_i = brute_force(mem, ids, queries, 10)
    assert_same_topk(mem, ids, queries, got, exp_i, strict=kind == "exact")
    np.testing.assert_allclose(scores, exp_s, atol=1e-5)
    one_piece = make_index(kind).build(mem, ids).search(queries, 10)[1]
    assert_same_topk(mem, ids, queries, got, one_piece, strict=kind == "exact")
    with pytest.raises(RetrievalError, match="exceeds the memory size"):
        sharded.search(queries, len(mem) + 1)


WORKER = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
    import numpy as np
    sys.path.insert(0, sys.argv[4])
    from test_distributed_search import memory_and_queries
    from retrieval.backends import make_index
    from retrieval.distributed import search_across_processes
    mem, queries = memory_and_queries()
    ids = np.arange(len(mem), dtype=np.int64)
    pid = jax.process_index()
    rows = slice(0, 1700) if pid == 0 else slice(1700, None)  # unequal pieces
    out = {}
    for kind in ("exact", "faiss_flat"):
        local = make_index(kind).build(mem[rows], ids[rows])
        out[kind + "_scores"], out[kind + "_ids"] = search_across_processes(local, queries, 10)
    # The index of a store in 3 pieces, each process building its share (jax's barrier).
    from jax.experimental import multihost_utils
    from retrieval.distributed import build_sharded_index
    from retrieval.memory_store import MemoryStore
    built = []
    index = build_sharded_index(MemoryStore.open(sys.argv[5]), "image", sys.argv[6], kind="exact", pieces=3,
                                process_index=pid, process_count=2, barrier=multihost_utils.sync_global_devices,
                                after_piece=built.append)
    out["pieces_built"] = np.array(built)
    out["pieces_scores"], out["pieces_ids"] = index.search(queries, 10)
    np.savez(sys.argv[3], **out)
""")


def test_memory_split_over_two_processes_equals_one_piece(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mem, queries = memory_and_queries()
    with MemoryWriter(tmp_path / "m", encoder_fingerprint="test", dim=mem.shape[1], shard_size=700) as w:
        w.add(np.arange(len(mem), dtype=np.int64), {"image": mem, "text": mem})
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, f"127.0.0.1:{port}", str(pid), str(tmp_path / f"{pid}.npz"),
                               str(REPO / "tests"), str(tmp_path / "m"), str(tmp_path / "index")], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**__import__("os").environ, "XLA_FLAGS": ""})
             for pid in (0, 1)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    exp_s, exp_i = brute_force(mem, np.arange(len(mem)), queries, 10)
    for pid in (0, 1):
        got = np.load(tmp_path / f"{pid}.npz")
        for kind in ("exact", "faiss_flat"):
            assert_same_topk(mem, np.arange(len(mem)), queries, got[kind + "_ids"], exp_i, strict=kind == "exact")
            np.testing.assert_allclose(got[kind + "_scores"], exp_s, atol=1e-5)
        # 5 shards in 3 pieces (shards 0, 1-2, 3-4): process 0 built pieces 0 and 2, process 1 piece 1
        assert got["pieces_built"].tolist() == ([0, 2] if pid == 0 else [1])
        np.testing.assert_array_equal(got["pieces_ids"], exp_i)
        np.testing.assert_array_equal(got["pieces_scores"], exp_s)
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [f"piece-0000{j}" for j in range(3)]


# ----------------------------------------------------------------------------------------------
# An index built in pieces, each process building its share (build_sharded_index)


class Died(Exception):
    pass


def sharded_store(tmp_path, n=3000, shard_size=400):
    mem, queries = memory_and_queries(n=n)
    ids = np.arange(len(mem), dtype=np.int64) * 5 + 11
    with MemoryWriter(tmp_path / "m", encoder_fingerprint="test", dim=mem.shape[1], shard_size=shard_size) as w:
        w.add(ids, {"image": mem, "text": mem})
    return MemoryStore.open(tmp_path / "m"), mem, ids, queries


def index_files(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def build_as_processes(store, out, count, pieces, kind="exact", die=None, timeout=60):
    """build_sharded_index as `count` processes; die=(p, j): process p dies after saving piece j.
    Returns (results, [(process, piece)] saved)."""
    from threaded_processes import run_as_processes

    saved = []

    def process(p, barrier):
        def after_piece(j):
            saved.append((p, j))
            if die == (p, j):
                raise Died
        return build_sharded_index(store, "image", str(out), kind=kind, pieces=pieces, process_index=p,
                                   process_count=count, barrier=barrier, after_piece=after_piece)

    return run_as_processes(process, count, timeout=timeout, expected=(Died,)), saved


def test_piece_shards_are_contiguous_balanced_and_cover_every_shard():
    for shards in range(1, 30):
        for pieces in range(1, 12):
            groups = piece_shards(shards, pieces)
            assert len(groups) == min(shards, pieces)
            assert [i for g in groups for i in g] == list(range(shards))
            assert max(map(len, groups)) - min(map(len, groups)) <= 1


@pytest.mark.parametrize("count", [1, 2, 3])
def test_index_built_in_pieces_by_processes_equals_the_one_piece_index(tmp_path, count):
    store, mem, ids, queries = sharded_store(tmp_path)  # 8 shards of 400 (the last 200)
    results, saved = build_as_processes(store, tmp_path / f"index{count}", count, pieces=3)
    assert sorted(saved) == sorted((j % count, j) for j in range(3))  # piece j on process j % count
    exp_s, exp_i = brute_force(mem, ids, queries, 10)
    for index in results:
        assert [p.ntotal for p in index.pieces] == [800, 1200, 1000]  # shards 0-1, 2-4, 5-7
        scores, got = index.search(queries, 10)
        np.testing.assert_array_equal(got, exp_i)
        np.testing.assert_array_equal(scores, exp_s)
        assert index.config()["kind"] == "sharded" and len(index.config()["pieces"]) == 3
    if count > 1:  # the same files as one process writes
        build_as_processes(store, tmp_path / "index1", 1, pieces=3)
        assert index_files(tmp_path / f"index{count}") == index_files(tmp_path / "index1")


def test_a_killed_piece_build_resumes_building_only_the_missing_pieces(tmp_path):
    store, mem, ids, queries = sharded_store(tmp_path)
    out = tmp_path / "index"
    results, saved = build_as_processes(store, out, 2, pieces=4, die=(1, 1), timeout=3)
    assert isinstance(results[1], Died) and isinstance(results[0], TimeoutError)
    assert sorted(saved) == [(0, 0), (0, 2), (1, 1)]
    results, saved = build_as_processes(store, out, 2, pieces=4)  # the same call again
    assert saved == [(1, 3)]
    for index in results:
        np.testing.assert_array_equal(index.search(queries, 10)[1], brute_force(mem, ids, queries, 10)[1])
    # Another number of pieces is another index: nothing of this one is reused.
    _, saved = build_as_processes(store, tmp_path / "index3", 1, pieces=3)
    assert sorted(saved) == [(0, 0), (0, 1), (0, 2)]


def test_a_piece_of_another_memory_is_rebuilt_not_searched(tmp_path):
    store, mem, ids, queries = sharded_store(tmp_path)
    out = tmp_path / "index"
    build_as_processes(store, out, 1, pieces=2)
    other = MemoryStore.open(sharded_store(tmp_path / "other", n=3000, shard_size=500)[0].directory)
    _, saved = build_as_processes(other, out, 1, pieces=2)  # same directory, another store
    assert sorted(saved) == [(0, 0), (0, 1)]


def test_index_pieces_arguments_are_checked(tmp_path):
    store = sharded_store(tmp_path, n=500)[0]
    for pieces in (0, -1, 1.5, True):
        with pytest.raises(RetrievalError, match="pieces="):
            build_sharded_index(store, "image", str(tmp_path / "i"), kind="exact", pieces=pieces)
    with pytest.raises(RetrievalError, match="needs a barrier"):
        build_sharded_index(store, "image", str(tmp_path / "i"), kind="exact", pieces=2, process_count=2)
    with pytest.raises(RetrievalError, match="process_index=2"):
        build_sharded_index(store, "image", str(tmp_path / "i"), kind="exact", pieces=2, process_index=2,
                            process_count=2, barrier=lambda name: None)
    assert not (tmp_path / "i").exists()
