"""Recall/speed curves of every kNN backend of retrieval/backends.py on one clustered memory.

    python -m benchmarks.retrieval --out retrieval.json --png retrieval.png
    python -m benchmarks.retrieval --n 50000 --dim 128 --backends exact,faiss_ivf_flat,scann --out r.json

The memory is n unit vectors around min(1000, n/100) random unit centres (centre + Gaussian noise
of norm ~0.5, L2-normalised, seed 0); the queries are fresh points drawn the same way, never
memory rows. ExactIndex (numpy, blocked) gives the ground truth and the exact queries/s, always,
whatever --backends says. Each backend is built once per build setting, then its search-time
parameter is swept on that index: IVF nprobe (and IVF-PQ's exact-reorder k_factor), HNSW
efSearch, ScaNN leaves to search (tree + asymmetric hashing + exact reorder). Per setting:
recall@10 against exact search, queries/s = queries / median wall time of --iters searches after
one warm-up (the JIT compile for the JAX backends), speedup_vs_exact = qps / exact qps of this
run, the build seconds of the index (repeated on each of its rows) and its serialised bytes.
The JAX backends search only the first --jax-queries queries (one query block by default): on
CPU they score every row per query, like exact search. The default 1M x 256 run takes ~10
minutes on 2 cores, half of it building HNSW with the backend's M=32, efConstruction=80.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import device_description, median_seconds, print_table, write_json
from retrieval.backends import KINDS, Index, make_index, recall_at_k

K = 10
TARGET_RECALL, TARGET_SPEEDUP = 0.95, 10.0


@dataclasses.dataclass
class Row:
    backend: str
    config: str
    recall_at_10: float
    qps: float
    speedup_vs_exact: float
    build_s: float
    index_bytes: int

    @property
    def index_mib(self) -> float:  # the table's unit; the JSON keeps bytes
        return self.index_bytes / 2**20


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One build of `backend` with `params`, and the search-time settings tried on it in turn."""
    backend: str
    params: dict
    settings: tuple[dict, ...] = ({},)


# ------------------------------------------------------------------------------------ data


def clustered_unit_vectors(n: int, dim: int, n_queries: int, seed: int = 0,
                           noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Memory [n, dim] and queries [n_queries, dim], float32, unit norm: random unit centres plus
    Gaussian noise of norm ~`noise`, normalised. Generated in chunks (1M x 256 is 1 GB)."""
    rng = np.random.default_rng(seed)
    n_centres = max(10, min(1000, n // 100))
    centres = rng.standard_normal((n_centres, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def points(m: int) -> np.ndarray:
        out = np.empty((m, dim), np.float32)
        for start in range(0, m, 65536):
            stop = min(m, start + 65536)
            x = centres[rng.integers(0, n_centres, stop - start)]
            x += noise / math.sqrt(dim) * rng.standard_normal((stop - start, dim), dtype=np.float32)
            out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return points(n), points(n_queries)


# ---------------------------------------------------------------------------------- sweeps


def sweeps(n: int) -> list[Sweep]:
    """The build and search settings per backend, scaled to n. Every setting names all of its
    search parameters, since a setting stays on the index until the next one replaces it.

    IVF uses nlist = sqrt(n), not the backend's 4 sqrt(n): FAISS trains k-means on up to 256
    points per list, so 4000 lists at 1M would spend ~10 minutes of a 2-core run training.
    IVF-PQ and ScaNN also sweep their exact reorder (k_factor x k, reorder candidates): on this
    data their recall is bounded by the quantised scores, not by the lists searched."""
    nlist = max(1, min(round(math.sqrt(n)), n // 39))
    leaves = max(2, min(round(math.sqrt(n)), n // 50))  # what ScannIndex resolves for tree mode

    def settings(*dicts: dict) -> tuple[dict, ...]:
        unique = {tuple(d.items()): d for d in dicts}  # capping at small n can repeat a setting
        return tuple(unique.values())

    def probe(p: int) -> int:
        return min(p, nlist)

    def search(fraction: float) -> int:
        return max(1, min(leaves, round(fraction * leaves)))

    return [
        Sweep("exact", {}),
        Sweep("faiss_flat", {}),
        Sweep("faiss_ivf_flat", {"nlist": nlist},
              settings(*({"nprobe": probe(p)} for p in (1, 2, 4, 16)))),
        Sweep("faiss_ivf_pq", {"nlist": nlist},
              settings(*({"nprobe": probe(p), "k_factor": f}
                         for p, f in ((1, 4.0), (4, 4.0), (4, 16.0), (4, 64.0), (16, 64.0))))),
        Sweep("faiss_hnsw", {}, settings(*({"ef_search": e} for e in (16, 32, 64, 128, 256)))),
        Sweep("scann", {"mode": "tree", "num_leaves": leaves},
              settings(*({"num_leaves_to_search": search(f), "reorder": r}
                         for f, r in ((0.005, 100), (0.01, 100), (0.02, 100), (0.05, 100),
                                      (0.01, 400), (0.02, 400), (0.05, 400))))),
        Sweep("jax_exact", {}),
        Sweep("jax_approx", {}),
    ]


def apply_setting(index: Index, setting: dict) -> None:
    """Sets search-time parameters on a built index without rebuilding it."""
    index.set_search_params(**setting)


def describe(index: Index, n_queries: int, all_queries: int) -> str:
    """The settings of one row, short: the resolved build parameters and the swept one."""
    p = index.config()["params"]
    kind = index.name
    if kind == "exact":
        text = f"numpy blocks {p['block_rows']}x{p['block_queries']}"
    elif kind == "faiss_flat":
        text = "IndexFlatIP"
    elif kind == "faiss_ivf_flat":
        text = f"nlist={p['nlist']} nprobe={p['nprobe']}"
    elif kind == "faiss_ivf_pq":
        text = (f"nlist={p['nlist']} pq={p['pq_m']}x{p['pq_nbits']}b nprobe={p['nprobe']} "
                f"reorder={p['k_factor']:g}k")
    elif kind == "faiss_hnsw":
        text = f"M={p['hnsw_m']} efC={p['ef_construction']} efSearch={p['ef_search']}"
    elif kind == "scann":
        text = (f"leaves={p['num_leaves']} search={p['num_leaves_to_search']} "
                f"ah={p['dims_per_block']} reorder={max(p['reorder'], 4 * K)}")
    elif kind == "jax_approx":
        text = f"approx_max_k recall_target={p['recall_target']:g}"
    else:
        text = "lax.top_k"
    return text if n_queries == all_queries else f"{text} (q={n_queries})"


# ------------------------------------------------------------------------------- measuring


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # a 1M run takes minutes


def search_rows(index: Index, queries: np.ndarray, truth: np.ndarray, n_all_queries: int,
                sweep: Sweep, build_s: float, index_bytes: int, iters: int,
                exact_qps: float | None) -> list[Row]:
    rows = []
    for setting in sweep.settings:
        apply_setting(index, setting)
        _, ids = index.search(queries, K)  # warm-up (JIT compile); its ids give the recall
        seconds = median_seconds(lambda: index.search(queries, K), iters)
        qps = len(queries) / seconds
        rows.append(Row(sweep.backend, describe(index, len(queries), n_all_queries),
                        recall_at_k(ids, truth[:len(queries)], K), qps,
                        qps / exact_qps if exact_qps else 1.0, build_s, index_bytes))
        log(f"    {rows[-1].config}: recall@10 {rows[-1].recall_at_10:.4f}, {qps:,.0f} q/s")
    return rows


def run(args: argparse.Namespace) -> tuple[list[Row], float]:
    """All rows, exact first; returns them with the exact qps."""
    start = time.perf_counter()
    memory, queries = clustered_unit_vectors(args.n, args.dim, args.queries)
    log(f"data: {args.n} x {args.dim} memory, {args.queries} queries in "
        f"{time.perf_counter() - start:.1f} s")
    truth = None
    exact_qps = None
    rows: list[Row] = []
    for sweep in sweeps(args.n):
        if sweep.backend != "exact" and sweep.backend not in args.backends:
            continue
        start = time.perf_counter()
        index = make_index(sweep.backend, **sweep.params).build(memory)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        index_bytes = index.size_bytes()
        log(f"{sweep.backend}: built in {build_s:.1f} s, {index_bytes / 2**20:,.0f} MiB "
            f"(size_bytes took {time.perf_counter() - start:.1f} s)")
        if truth is None:  # the exact sweep comes first: ground truth for every other row
            truth = index.search(queries, K)[1]
        n_q = args.jax_queries if sweep.backend.startswith("jax_") else args.queries
        rows += search_rows(index, queries[:n_q], truth, args.queries, sweep, build_s,
                            index_bytes, args.iters, exact_qps)
        if exact_qps is None:
            exact_qps = rows[0].qps
        del index
        gc.collect()  # one index of a 1M memory at a time
    return rows, exact_qps


def target_line(rows: list[Row]) -> str:
    hits = [r for r in rows if r.backend.startswith(("faiss", "scann"))
            and r.recall_at_10 >= TARGET_RECALL and r.speedup_vs_exact >= TARGET_SPEEDUP]
    goal = f"target recall@10 >= {TARGET_RECALL} at >= {TARGET_SPEEDUP:g}x exact q/s (FAISS/ScaNN)"
    if not hits:
        return f"{goal}: NOT met"
    best = max(hits, key=lambda r: r.qps)
    return (f"{goal}: met by {len(hits)} settings; fastest {best.backend} [{best.config}]: "
            f"recall@10 {best.recall_at_10:.4f}, {best.speedup_vs_exact:.1f}x")


def save_plot(rows: list[Row], exact_qps: float, path: Path, title: str) -> None:
    """recall@10 against queries/s (log x), one line per backend; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    markers = "osD^vP*Xh<>"
    for i, backend in enumerate(dict.fromkeys(r.backend for r in rows)):
        points = sorted((r.qps, r.recall_at_10) for r in rows if r.backend == backend)
        ax.plot(*zip(*points), marker=markers[i % len(markers)], label=backend)
    ax.axvline(TARGET_SPEEDUP * exact_qps, color="grey", ls=":", lw=1,
               label=f"target: recall {TARGET_RECALL}, {TARGET_SPEEDUP:g}x exact q/s")
    ax.axhline(TARGET_RECALL, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("queries / s (log)")
    ax.set_ylabel(f"recall@{K}")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)


TABLE = [("backend", "backend", "<14"), ("config", "config", "<52"),
         ("recall@10", "recall_at_10", ">9.4f"), ("q/s", "qps", ">10.0f"),
         ("speedup", "speedup_vs_exact", ">8.1f"), ("build_s", "build_s", ">8.1f"),
         ("MiB", "index_mib", ">8.0f")]


# ------------------------------------------------------------------------------------- CLI


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one `error: ...` line instead of usage + message
        raise _UsageError(message)


def parse_args(argv) -> argparse.Namespace:
    p = _Parser(prog="python -m benchmarks.retrieval", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="memory rows (>= 1000)")
    p.add_argument("--dim", type=int, default=256, help="embedding dimension (>= 2)")
    p.add_argument("--queries", type=int, default=500, help="queries per search (>= 1)")
    p.add_argument("--jax-queries", type=int, default=256,
                   help="queries for jax_exact / jax_approx (capped at --queries)")
    p.add_argument("--iters", type=int, default=3, help="timed searches per setting; median")
    p.add_argument("--backends", default=",".join(KINDS),
                   help=f"comma-separated, from {','.join(KINDS)}; exact always runs")
    p.add_argument("--out", type=Path, required=True, help="JSON results")
    p.add_argument("--png", type=Path, help="recall@10 vs queries/s plot")
    p.add_argument("--reader-examples", type=int, default=20000,
                   help="examples for the tf.data neighbour-reader measurement (0 = skip it)")
    args = p.parse_args(argv)
    if args.n < 1000:
        p.error(f"--n must be >= 1000, got {args.n}")
    if args.dim < 2:
        p.error(f"--dim must be >= 2, got {args.dim}")
    if args.queries < 1 or args.jax_queries < 1:
        p.error(f"--queries and --jax-queries must be >= 1, got {args.queries}, {args.jax_queries}")
    if args.reader_examples < 0:
        p.error(f"--reader-examples must be >= 0, got {args.reader_examples}")
    if args.iters < 1:
        p.error(f"--iters must be >= 1, got {args.iters}")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in args.backends if b not in KINDS]
    if unknown or not args.backends:
        p.error(f"--backends: unknown {unknown or args.backends}; expected from {', '.join(KINDS)}")
    for flag, path in (("--out", args.out), ("--png", args.png)):
        if path is not None and not path.parent.is_dir():
            p.error(f"{flag}: directory {path.parent} does not exist")
    args.jax_queries = min(args.jax_queries, args.queries)
    return args


def reader_throughput(examples: int, k: int = 10, dim: int = 512, batch: int = 256) -> dict:
    """examples/s of the tf.data neighbour reader (shuffled, batched, parsed, prefetched) and of the
    step-indexed random-access reader training uses (NeighbourRows under StepIndexedBatches, read
    ahead on a host thread; counted per example of two sides) on precomputed shards of `examples`
    examples with k neighbours of `dim`, against the examples/s the paper-sized RECO train step
    consumes (PAPER_FUSION, k = 10, 512-d) at the same batch."""
    import tempfile

    from benchmarks.train_step import measure, matmul_peak
    from retrieval.backends import make_index
    from retrieval.memory_store import MemoryStore, MemoryWriter
    from retrieval.neighbour_reader import NeighbourRows, neighbour_dataset
    from retrieval.precompute import precompute_neighbours
    from retrieval.search import RECO_MODES
    from vlcore.training.input_order import StepIndexedBatches

    memory, queries = clustered_unit_vectors(max(4 * k, 20000), dim, examples, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        with MemoryWriter(f"{tmp}/memory", encoder_fingerprint="benchmark", dim=dim) as writer:
            writer.add(np.arange(len(memory)), {"image": memory, "text": memory[::-1].copy()})
        store = MemoryStore.open(f"{tmp}/memory")
        precompute_neighbours(f"{tmp}/nb", index=make_index("faiss_flat").build(memory), store=store,
                              mode=RECO_MODES["uni_modal_search"]["image"], queries=queries, k=k,
                              fields={"image": queries, "text": queries, "example_id": np.arange(examples)},
                              progress=False)

        def epoch():
            seen = 0
            for b in neighbour_dataset(f"{tmp}/nb", batch_size=batch, shuffle_seed=0):
                seen += int(b["neighbour_embeddings"].shape[0])
            return seen

        batches = StepIndexedBatches(NeighbourRows(f"{tmp}/nb", fields=("image", "neighbour_embeddings")),
                                     batch, seed=0)

        def step_indexed_epoch():  # what training reads: one side's rows of each step, in step order
            seen = 0
            for b in batches.iterate(0, batches.steps_per_epoch):
                seen += int(b["neighbour_embeddings"].shape[0])
            return seen

        epoch()  # warm-up: file cache, tf.function tracing
        seconds = median_seconds(epoch, 3)
        step_indexed_epoch()
        random_seconds = median_seconds(step_indexed_epoch, 3)
    step = measure("reco_paper", batch, 3, matmul_peak(np.float32, 1024))
    # RECO's training reads two sides (image and text neighbours) per example.
    random_per_s = batches.steps_per_epoch * batch / random_seconds / 2
    return {"examples": examples, "k": k, "dim": dim, "batch": batch,
            "reader_examples_per_s": examples / seconds, "reco_step_examples_per_s": step.examples_per_s,
            "reader_over_step": examples / seconds / step.examples_per_s,
            "step_indexed_examples_per_s": random_per_s, "step_indexed_over_step": random_per_s / step.examples_per_s}


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # scann imports TensorFlow
    started, load_start = time.perf_counter(), os.getloadavg()[0]  # other work skews q/s
    rows, exact_qps = run(args)
    device = device_description()
    print(f"device: {device}; memory {args.n} x {args.dim}, {args.queries} queries, "
          f"k={K}; exact {exact_qps:,.1f} q/s")
    print_table(rows, TABLE)
    print(target_line(rows))
    reader = None
    if args.reader_examples:
        log(f"tf.data reader: {args.reader_examples} examples, k=10, dim 512")
        reader = reader_throughput(args.reader_examples)
        print(f"tf.data neighbour reader (k={reader['k']}, dim {reader['dim']}, batch {reader['batch']}): "
              f"{reader['reader_examples_per_s']:,.0f} examples/s; the paper-sized RECO train step consumes "
              f"{reader['reco_step_examples_per_s']:,.0f} examples/s here (reader / step = "
              f"{reader['reader_over_step']:.1f})")
        print(f"step-indexed random access (what training reads; both sides' shards per example): "
              f"{reader['step_indexed_examples_per_s']:,.0f} examples/s (/ step = {reader['step_indexed_over_step']:.1f})")
    write_json(args.out, {"device": device, "n": args.n, "dim": args.dim, "queries": args.queries,
                          "rows": [dataclasses.asdict(r) for r in rows], "reader": reader})
    if args.png is not None:
        save_plot(rows, exact_qps, args.png, f"{args.n:,} x {args.dim}, {device}")
    print(f"total {time.perf_counter() - started:.0f} s; load average (1 min) at start / end: "
          f"{load_start:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
