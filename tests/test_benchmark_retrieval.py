"""The retrieval benchmark tool: its JSON schema and plot, its recall (against numpy brute force on
the searched ids), its search-time sweeps, its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import retrieval
from retrieval.backends import Index, make_index, recall_at_k

REPO = str(Path(__file__).resolve().parents[1])
ROW_KEYS = {"backend", "config", "recall_at_10", "qps", "speedup_vs_exact", "build_s", "index_bytes"}
BACKENDS = ["exact", "faiss_flat", "faiss_ivf_flat", "faiss_hnsw", "scann", "jax_exact", "jax_approx"]
N, DIM, QUERIES = 5000, 32, 100


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One small benchmark run, recording every search it makes: (backend, search params in
    effect, queries shape, k, ids returned)."""
    out_dir = tmp_path_factory.mktemp("retrieval")
    out, png = out_dir / "r.json", out_dir / "r.png"
    searches = []
    real_search = Index.search

    def recording_search(self, queries, k):
        scores, ids = real_search(self, queries, k)
        searches.append((self.name, self.search_params(), np.shape(queries), k, ids))
        return scores, ids

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Index, "search", recording_search)
        code = retrieval.main(["--n", str(N), "--dim", str(DIM), "--queries", str(QUERIES), "--iters", "1",
                               "--reader-examples", "1024", "--backends", ",".join(BACKENDS[1:]),
                               "--out", str(out), "--png", str(png)])
    return code, out, png, searches


def test_tiny_run_writes_json_and_png(tiny_run, capsys):
    code, out, png, _ = tiny_run
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result) == {"device", "n", "dim", "queries", "rows", "reader"}
    reader = result["reader"]
    assert (reader["examples"], reader["k"], reader["dim"]) == (1024, 10, 512)
    assert reader["reader_examples_per_s"] > 0 and reader["reco_step_examples_per_s"] > 0
    assert reader["reader_over_step"] == pytest.approx(reader["reader_examples_per_s"]
                                                       / reader["reco_step_examples_per_s"])
    assert reader["step_indexed_over_step"] == pytest.approx(reader["step_indexed_examples_per_s"]
                                                             / reader["reco_step_examples_per_s"])
    assert (result["n"], result["dim"], result["queries"]) == (5000, 32, 100)
    assert result["device"].startswith("cpu")
    rows = result["rows"]
    assert [r["backend"] for r in rows[:2]] == ["exact", "faiss_flat"]  # exact runs first, unasked
    assert {r["backend"] for r in rows} == set(BACKENDS)
    for r in rows:
        assert set(r) == ROW_KEYS
        assert 0.0 <= r["recall_at_10"] <= 1.0
        assert r["qps"] > 0 and r["build_s"] >= 0 and r["index_bytes"] > 0
        assert r["speedup_vs_exact"] == pytest.approx(r["qps"] / rows[0]["qps"])
    exact = rows[0]
    assert exact["recall_at_10"] == 1.0
    assert exact["speedup_vs_exact"] == pytest.approx(1.0)
    assert exact["index_bytes"] >= 5000 * 32 * 4  # the float32 memory itself
    by_backend = {b: [r for r in rows if r["backend"] == b] for b in BACKENDS}
    assert by_backend["faiss_flat"][0]["recall_at_10"] == 1.0
    assert by_backend["jax_exact"][0]["recall_at_10"] == 1.0
    for swept in ("faiss_ivf_flat", "faiss_hnsw", "scann"):  # one build, several search settings
        assert len(by_backend[swept]) > 1
        assert len({r["config"] for r in by_backend[swept]}) == len(by_backend[swept])
        assert len({r["build_s"] for r in by_backend[swept]}) == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob("*.tmp"))


# how describe() shows each search parameter in a row's config (ScaNN reorders >= 4k = 40)
SHOWN = {"nprobe": "nprobe={}", "k_factor": "reorder={:g}k", "ef_search": "efSearch={}",
         "num_leaves_to_search": "search={}", "reorder": "ah=2 reorder={}",
         "recall_target": "recall_target={:g}"}


def test_reported_recall_is_recall_of_the_searched_ids_against_numpy_brute_force(tiny_run):
    _, out, _, searches = tiny_run
    rows = json.loads(out.read_text())["rows"]
    memory, queries = retrieval.clustered_unit_vectors(N, DIM, QUERIES)  # the run's data (seed 0)
    scores = queries.astype(np.float64) @ memory.astype(np.float64).T
    truth = np.argsort(-scores, axis=1)[:, :10]
    assert (np.sort(scores, axis=1)[:, -10] > np.sort(scores, axis=1)[:, -11]).all()  # no tie at rank 10
    # the benchmark's searches, grouped by (backend, search params in effect), in order
    runs: dict = {}
    for name, params, shape, k, ids in searches:
        if shape == (QUERIES, DIM) and k == 10:  # not the tf.data reader's precompute
            runs.setdefault((name, tuple(params.items())), []).append(ids)
    assert [name for name, _ in runs] == [r["backend"] for r in rows]  # one row per setting searched
    for row, ((name, params), ids_seen) in zip(rows, runs.items()):
        for ids in ids_seen[1:]:  # warm-up and timed searches returned the same ids
            np.testing.assert_array_equal(ids, ids_seen[0])
        hits = [len(set(a) & set(b)) for a, b in zip(ids_seen[0].tolist(), truth.tolist())]
        assert row["recall_at_10"] == pytest.approx(np.mean(hits) / 10), row
        for param, value in params:  # the row's config names the setting that was searched
            shown = SHOWN[param].format(max(value, 40) if param == "reorder" else value)
            assert shown in row["config"], (param, value, row["config"])
    recall = {b: [r["recall_at_10"] for r in rows if r["backend"] == b] for b in BACKENDS}
    for exact in ("exact", "faiss_flat", "jax_exact"):
        assert recall[exact] == [1.0]
    # the poorest settings (1 IVF list, 1 ScaNN leaf) miss neighbours that more lists/leaves find
    assert recall["faiss_ivf_flat"][0] < 1.0 and recall["faiss_ivf_flat"][-1] > recall["faiss_ivf_flat"][0]
    assert recall["scann"][0] < 1.0 and max(recall["scann"]) > recall["scann"][0]


def clustered_and_truth(n=4000, d=32, nq=200):
    memory, queries = retrieval.clustered_unit_vectors(n, d, nq, seed=3)
    exact = np.argsort(-(queries.astype(np.float64) @ memory.astype(np.float64).T), axis=1)[:, :10]
    return memory, queries, exact


def test_data_is_unit_norm_clustered_and_queries_are_not_memory_rows():
    memory, queries, _ = clustered_and_truth()
    assert memory.dtype == queries.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(memory, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    nearest = (queries @ memory.T).max(axis=1)
    assert nearest.max() < 0.999  # fresh points, not copies of memory rows
    assert nearest.min() > 0.5  # but each lies in a populated cluster
    again, _ = retrieval.clustered_unit_vectors(4000, 32, 200, seed=3)
    np.testing.assert_array_equal(memory, again)  # seeded


def test_faiss_settings_apply_without_rebuilding():
    memory, queries, exact = clustered_and_truth()
    index = make_index("faiss_ivf_flat", nlist=32).build(memory)
    retrieval.apply_setting(index, {"nprobe": 32})  # every list: exact search
    np.testing.assert_array_equal(index.search(queries, 10)[1], exact)
    retrieval.apply_setting(index, {"nprobe": 1})
    assert "nprobe=1" in retrieval.describe(index, 200, 200)
    hnsw = make_index("faiss_hnsw").build(memory)
    retrieval.apply_setting(hnsw, {"ef_search": 512})
    assert recall_at_k(hnsw.search(queries, 10)[1], exact, 10) >= 0.99


def test_scann_leaves_to_search_changes_the_search():
    rng = np.random.default_rng(0)  # unclustered: a query's neighbours spread over many leaves
    memory = rng.standard_normal((5000, 16)).astype(np.float32)
    memory /= np.linalg.norm(memory, axis=1, keepdims=True)
    queries = memory[:100] + 0.1 * rng.standard_normal((100, 16)).astype(np.float32)
    exact = np.argsort(-(queries @ memory.T), axis=1)[:, :10]
    index = make_index("scann", mode="tree", num_leaves=50, num_leaves_to_search=1).build(memory)
    recalls = []
    for leaves in (1, 50, 1):
        retrieval.apply_setting(index, {"num_leaves_to_search": leaves})
        recalls.append(recall_at_k(index.search(queries, 10)[1], exact, 10))
    assert recalls[1] >= 0.95 > recalls[0] == recalls[2]
    assert "search=1" in retrieval.describe(index, 100, 100)


@pytest.mark.parametrize("args, message", [
    (["--n", "999"], "--n"),
    (["--dim", "1"], "--dim"),
    (["--queries", "0"], "--queries"),
    (["--reader-examples", "-1"], "--reader-examples"),
    (["--backends", "exact,faiss_lsh"], "faiss_lsh"),
    (["--png", "/nonexistent-dir/r.png"], "--png"),
])
def test_bad_input_exits_2_with_one_error_line_and_no_files(args, message, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert retrieval.main(["--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert list(tmp_path.iterdir()) == []


def test_out_in_missing_directory_from_the_command_line(tmp_path):
    out = tmp_path / "missing" / "r.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.retrieval", "--n", "5000", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --out: directory {out.parent} does not exist"]
    assert proc.stdout == ""
    assert not out.parent.exists()
