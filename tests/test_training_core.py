"""Tests of the training core (`vlcore.training`, `vlcore.main`) on the two-tower `tiny` trainer.

The end-to-end cases run `python -m vlcore.main` in subprocesses (fake CPU devices need
XLA_FLAGS before JAX starts; several processes need their own interpreters) and compare what
the runs leave in their work dirs: the Orbax checkpoints (restored here as numpy, independently
of the trainer) and the TensorBoard event files. One tiny world is generated per session and
shared; a persistent JAX compilation cache (per session) saves recompiling identical programs.
The subprocesses are started early by session fixtures and overlap (see below), so the whole
file takes about 3-4 minutes on 2 cores; every subprocess has a timeout.

The in-process cases (first, fast) check the batch order, the learning-rate schedule and the
loop's preemption path on a toy task.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import checkpoint_steps, restore_state, zero_gradient_param

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "two_tower_world.py"
TIMEOUT = 480  # seconds any one subprocess may take before the test fails (no hang blocks CI)

# A few steps of the tiny preset, with a ViT wide enough (64, MLP 256) that FSDP really shards
# some kernels (fsdp_spec leaves arrays under 2**14 elements replicated).
SHORT = ["--config.num_steps=4", "--config.model.hidden_size=64", "--config.model.intermediate_size=256"]
# Long enough to be interrupted; one logged step each (the first log says training started).
LONG_STEPS = 300
LONG = [f"--config.num_steps={LONG_STEPS}", "--config.log_every=1"]
THROUGHPUT_TAGS = {"steps_per_s", "examples_per_s", "model_tflops_per_s"}


# ----------------------------------------------------------------------------------------------
# Running the trainer


class Run:
    """One `python -m vlcore.main` subprocess (output to files: a full pipe would block it)."""

    def __init__(self, workdir: Path, args: list[str], data_dir: Path, cache_dir: Path, log_dir: Path,
                 devices: int = 1, config: str | Path = f"{CONFIG}:tiny", log_name: str | None = None):
        self.workdir = Path(workdir)
        log_dir.mkdir(parents=True, exist_ok=True)
        name = log_name or self.workdir.name
        self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        self.cmd = [sys.executable, "-m", "vlcore.main", f"--config={config}", f"--workdir={self.workdir}",
                    f"--config.world.data_dir={data_dir}", *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
        env.update(
            TF_CPP_MIN_LOG_LEVEL="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
            JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
            JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
            PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        )
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                         cwd=REPO)
        self.started = time.monotonic()
        self.returncode: int | None = None

    def wait(self, timeout: float = TIMEOUT) -> "Run":
        if self.returncode is None:
            remaining = max(1.0, timeout - (time.monotonic() - self.started))
            try:
                self.returncode = self.proc.wait(remaining)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"timed out after {timeout:.0f} s: {' '.join(self.cmd)}\n{self.tail()}")
        return self

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def tail(self, n: int = 4000) -> str:
        return f"--- stdout\n{self.stdout[-n:]}\n--- stderr\n{self.stderr[-n:]}"

    def expect(self, code: int) -> "Run":
        self.wait()
        assert self.returncode == code, f"exit {self.returncode} (expected {code}): {' '.join(self.cmd)}\n{self.tail()}"
        return self

    def final_metrics(self) -> dict[str, float]:
        """The JSON of final eval metrics the run printed (other lines, e.g. gloo's, skipped)."""
        lines = self.stdout.splitlines()
        start = lines.index("{")
        end = lines.index("}", start)
        return json.loads("\n".join(lines[start:end + 1]))


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("training_core")


@pytest.fixture(scope="session")
def start(session_dir):
    """start(workdir, args, devices=1, ...) -> Run, sharing the session's world and JAX cache."""
    data_dir, cache_dir = session_dir / "world", session_dir / "jax_cache"
    runs: list[Run] = []
    lock, closed = threading.Lock(), threading.Event()

    def _start(workdir: Path, args: list[str], **kwargs) -> Run:
        with lock:  # background threads start reruns too
            if closed.is_set():
                raise RuntimeError("the test session is over")
            run = Run(workdir, args, data_dir, cache_dir, session_dir / "logs", **kwargs)
            runs.append(run)
            return run

    yield _start
    with lock:
        closed.set()
        for run in runs:  # a failed or deselected test may leave a run behind
            run.kill()


# ----------------------------------------------------------------------------------------------
# Reading what a run left


def max_abs_diff(a: Any, b: Any) -> float:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    diffs = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) if np.size(x) else 0.0
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    return max(diffs, default=0.0)


def assert_params_close(a: Path, b: Path, atol: float, skip=lambda path: False) -> None:
    sa, sb = restore_state(a), restore_state(b)
    assert int(sa["step"]) == int(sb["step"])
    pa = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(sa["params"])[0]}
    pb = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(sb["params"])[0]}
    assert pa.keys() == pb.keys()
    compared = [k for k in pa if not skip(k)]
    assert len(compared) >= len(pa) - 2
    diffs = {k: max_abs_diff(pa[k], pb[k]) for k in compared}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= atol, f"params of {a.name} and {b.name} differ by {diffs[worst]:.3g} > {atol} at {worst}"


def event_files(workdir: Path) -> list[Path]:
    return sorted((Path(workdir) / "tensorboard").glob("events.out.tfevents.*"))


def read_file_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of one event file (throughput tags left out: wall clock)."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(str(path), size_guidance={"tensors": 0, "scalars": 0},
                                             purge_orphaned_data=False)
    acc.Reload()
    out: dict[str, list[tuple[int, float]]] = {}
    tags = acc.Tags()
    for tag in tags.get("tensors", []):
        out[tag] = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
    for tag in tags.get("scalars", []):
        out[tag] = [(e.step, float(e.value)) for e in acc.Scalars(tag)]
    return {k: v for k, v in out.items() if k not in THROUGHPUT_TAGS}


def read_scalars(workdir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} over all event files of a run; a step logged twice (by a resumed
    run) must have the same value both times."""
    merged: dict[str, dict[int, float]] = {}
    for path in event_files(workdir):
        for tag, points in read_file_scalars(path).items():
            seen = merged.setdefault(tag, {})
            for step, value in points:
                if step in seen:
                    assert seen[step] == value, f"{tag} at step {step} logged as {seen[step]} and {value}"
                seen[step] = value
    assert merged, f"no scalars in {workdir}/tensorboard"
    return merged


def assert_same_scalars(a: Path, b: Path, rtol: float = 0.0, atol: float = 0.0, tags: set[str] | None = None):
    sa, sb = read_scalars(a), read_scalars(b)
    assert "loss" in sa and len(sa["loss"]) >= 2
    names = set(sa) | set(sb) if tags is None else tags
    for tag in sorted(names):
        assert tag in sa and tag in sb, f"{tag}: logged by only one of {a.name}, {b.name}"
        assert sorted(sa[tag]) == sorted(sb[tag]), f"{tag}: logged at different steps"
        steps = sorted(sa[tag])
        np.testing.assert_allclose([sa[tag][s] for s in steps], [sb[tag][s] for s in steps], rtol=rtol, atol=atol,
                                   err_msg=f"{tag} of {a.name} vs {b.name}")


def loss_logged(workdir: Path) -> bool:
    """Whether the run has logged a loss (a cheap look at the raw event files, no parsing)."""
    return any(b"loss" in path.read_bytes() for path in event_files(workdir))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under `directory` with its size and modification time."""
    return {str(p.relative_to(directory)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


# ----------------------------------------------------------------------------------------------
# 8. Batch order and learning-rate schedule (in process)


def test_step_indexed_batches_cover_each_epoch_once_and_resume():
    from vlcore.training.input_order import StepIndexedBatches

    n, batch, procs = 96, 12, 3
    arrays = {"x": np.arange(n) * 10, "y": np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)}
    whole = StepIndexedBatches(arrays, batch, seed=7)
    parts = [StepIndexedBatches(arrays, batch, seed=7, process_index=p, process_count=procs) for p in range(procs)]
    assert whole.steps_per_epoch == n // batch == 8
    for epoch in range(3):
        seen = []
        for step in range(epoch * 8, (epoch + 1) * 8):
            global_batch = whole.local_batch_at(step)
            local = [p.local_batch_at(step) for p in parts]
            for key in arrays:  # the global batch is the concatenation of the process slices
                np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), global_batch[key])
            assert all(len(b["x"]) == batch // procs for b in local)
            np.testing.assert_array_equal(global_batch["y"][:, 0], global_batch["x"] / 10)  # rows stay aligned
            seen.extend(global_batch["x"] // 10)
        assert sorted(seen) == list(range(n)), f"epoch {epoch} is not a permutation of the examples"
    # Epochs are shuffled differently; the same seed gives the same order, another seed another.
    assert not np.array_equal(whole.global_indices(0), whole.global_indices(8))
    np.testing.assert_array_equal(whole.global_indices(5), StepIndexedBatches(arrays, batch, seed=7).global_indices(5))
    assert not np.array_equal(whole.global_indices(0), StepIndexedBatches(arrays, batch, seed=8).global_indices(0))
    # Resuming at step s yields exactly what iterating from 0 yields from s on, for every process.
    for p in parts + [whole]:
        full = list(p.iterate(0, 30))
        resumed = list(p.iterate(13, 30))
        assert len(full) == 30 and len(resumed) == 17
        for a, b in zip(full[13:], resumed):
            np.testing.assert_array_equal(a["x"], b["x"])


def test_step_indexed_batches_drop_the_remainder_and_check_sizes():
    from vlcore.training.input_order import StepIndexedBatches

    arrays = {"x": np.arange(100)}
    batches = StepIndexedBatches(arrays, 16, seed=0)
    assert batches.steps_per_epoch == 6
    for epoch in range(2):
        seen = np.concatenate([batches.global_indices(s) for s in range(epoch * 6, epoch * 6 + 6)])
        assert len(seen) == 96 and len(set(seen.tolist())) == 96  # each example at most once per epoch
    with pytest.raises(ValueError, match="exceeds"):
        StepIndexedBatches(arrays, 101, seed=0)
    with pytest.raises(ValueError, match="divisible"):
        StepIndexedBatches(arrays, 16, seed=0, process_count=3)
    with pytest.raises(ValueError, match="different lengths"):
        StepIndexedBatches({"x": np.arange(10), "y": np.arange(9)}, 2, seed=0)


class CountingRows:
    """A RowSource over arrays that records what it was asked for and from which thread."""

    def __init__(self, arrays):
        self.arrays, self.calls = arrays, []

    def __len__(self):
        return len(self.arrays["x"])

    def read_rows(self, index):
        import threading

        self.calls.append((threading.current_thread().name, np.asarray(index).copy()))
        return {k: v[index] for k, v in self.arrays.items()}


def test_a_row_source_streams_the_same_batches_read_ahead_on_a_host_thread():
    from vlcore.training.input_order import StepIndexedBatches

    n, batch = 96, 12
    arrays = {"x": np.arange(n) * 10, "y": np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)}
    source = CountingRows(arrays)
    streamed = StepIndexedBatches(source, batch, seed=7, process_index=1, process_count=2)
    in_memory = StepIndexedBatches(arrays, batch, seed=7, process_index=1, process_count=2)
    got = list(streamed.iterate(5, 20))
    assert len(got) == 15
    for step, b in zip(range(5, 20), got):
        want = in_memory.local_batch_at(step)
        for key in arrays:
            np.testing.assert_array_equal(b[key], want[key])
    # Only this process's rows of each step were read, once, in step order, on the input thread.
    assert len(source.calls) == 15 and all(name.startswith("input") for name, _ in source.calls)
    for step, (_, index) in zip(range(5, 20), source.calls):
        np.testing.assert_array_equal(index, in_memory.local_indices(step))
        assert len(index) == batch // 2
    # Stopping early (a preemption) reads at most the read-ahead beyond what was consumed.
    source.calls.clear()
    it = streamed.iterate(0, 50, read_ahead=2)
    next(it), next(it)
    it.close()
    assert len(source.calls) <= 4


def test_map_over_processes_equals_the_one_process_result():
    import threading

    from vlcore.process_shares import map_over_processes, process_share

    for n, count in ((10, 3), (2, 3), (7, 1)):
        shares = [process_share(n, p, count) for p in range(count)]
        assert sum(s.stop - s.start for s in shares) == n and all(s.start <= s.stop for s in shares)
        assert [s.start for s in shares[1:]] == [s.stop for s in shares[:-1]]  # contiguous, disjoint
    rows = np.arange(20, dtype=np.float32).reshape(10, 2)
    fn = lambda x: np.stack([x.sum(1), x[:, 0] * 2], 1)  # noqa: E731  (row-wise)
    for n in (10, 2):  # 2 rows over 3 processes: one process has none
        gathered: dict[int, np.ndarray] = {}
        barrier = threading.Barrier(3)
        outs = [None] * 3

        def allgather(x, p):
            gathered[p] = x
            barrier.wait(10)
            return np.stack([gathered[q] for q in range(3)])

        def process(p):
            outs[p] = map_over_processes(fn, rows[:n], process_index=p, process_count=3,
                                         allgather=lambda x: allgather(x, p))

        threads = [threading.Thread(target=process, args=(p,)) for p in range(3)]
        [t.start() for t in threads]
        [t.join(30) for t in threads]
        for out in outs:
            np.testing.assert_array_equal(out, fn(rows[:n]))


def expected_lr(kind: str, step: int, lr: float, warmup: int, total: int) -> float:
    """The documented schedule: linear warm-up from 0 over `warmup` steps, then decay to 0 at `total`."""
    if step < warmup:
        return lr * step / warmup
    frac = min((step - warmup) / (total - warmup), 1.0)
    return {"cosine": lr * 0.5 * (1 + math.cos(math.pi * frac)), "linear": lr * (1 - frac), "constant": lr}[kind]


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 1, 10])
def test_make_optimizer_schedule(kind, warmup):
    from vlcore.training.loop import make_optimizer

    lr, total = 3e-3, 100
    cfg = ml_collections.ConfigDict(dict(name="adamw", lr=lr, warmup_steps=warmup, schedule=kind,
                                         weight_decay=0.0, grad_clip_norm=0.0))
    _, schedule = make_optimizer(cfg, total)
    for step in sorted({0, 1, warmup // 2, warmup, warmup + 1, 37, total // 2, total - 1, total, total + 5}):
        np.testing.assert_allclose(float(schedule(step)), expected_lr(kind, step, lr, warmup, total), rtol=1e-5,
                                   atol=1e-9, err_msg=f"{kind} schedule, warmup {warmup}, step {step}")


def test_make_optimizer_uses_the_schedule():
    """One SGD step (no momentum) moves the parameters by exactly lr(0) * grad."""
    from vlcore.training.loop import make_optimizer

    cfg = ml_collections.ConfigDict(dict(name="sgd", lr=0.5, warmup_steps=0, schedule="constant", momentum=0.0,
                                         grad_clip_norm=0.0))
    tx, schedule = make_optimizer(cfg, 10)
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.asarray([1.0, 2.0, 3.0])}, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.5 * np.array([1.0, 2.0, 3.0]), rtol=1e-6)
    with pytest.raises(ValueError, match="schedule"):
        make_optimizer(ml_collections.ConfigDict(dict(lr=1.0, schedule="step")), 10)


# ----------------------------------------------------------------------------------------------
# The loop's preemption path on a toy task (in process, fast)


class ToyTask:
    """Linear regression on fixed random data: a TrainTask the loop can run in a second."""

    def __init__(self, width: int = 3):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((64, 4)).astype(np.float32)
        self.y = (self.x @ rng.standard_normal((4, width))).astype(np.float32)
        self.width = width

    def fingerprint(self):
        return {"model": "toy", "width": self.width}

    def init_params(self, rng):
        return {"w": jax.random.normal(rng, (4, self.width)) * 0.1, "b": jnp.zeros(self.width)}

    def loss(self, params, batch, rng, step):
        err = batch["x"] @ params["w"] + params["b"] - batch["y"]
        return jnp.mean(err**2), {"abs_err": jnp.mean(jnp.abs(err))}

    def train_arrays(self):
        return {"x": self.x, "y": self.y}

    def evaluate(self, params):
        return {"mse": float(np.mean((self.x @ np.asarray(params["w"]) + np.asarray(params["b"]) - self.y) ** 2))}


def toy_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(dict(
        name="toy", seed=0, batch_size=8, num_steps=10, fsdp=1, log_every=1, save_every=2, keep_checkpoints=10,
        async_checkpoints=True,
        optimizer=dict(name="adamw", lr=0.05, warmup_steps=2, schedule="cosine", weight_decay=0.0, grad_clip_norm=1.0),
    ))
    config.update(overrides)
    return config


class PreemptAt:
    """Stands in for PreemptionSignal: reports a SIGTERM once `step` steps are done."""

    def __init__(self, step: int):
        self.step = step

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def requested(self, step: int) -> bool:  # the loop asks after each step but the last
        return step >= self.step


@pytest.mark.parametrize("preempt_at", [3, 4])  # 4 is also a regular save step (save_every=2)
def test_loop_preemption_saves_and_resumes_exactly(tmp_path, monkeypatch, preempt_at):
    from vlcore.training import loop

    reference = loop.train(ToyTask(), toy_config(), tmp_path / "reference")
    assert checkpoint_steps(tmp_path / "reference") == [2, 4, 6, 8, 10]  # every save_every steps, no others
    assert not reference.preempted and reference.final_metrics["mse"] < ToyTask().evaluate(
        ToyTask().init_params(jax.random.key(0)))["mse"]

    workdir = tmp_path / "preempted"
    with monkeypatch.context() as m:
        m.setattr(loop, "PreemptionSignal", lambda manager: PreemptAt(preempt_at))
        first = loop.train(ToyTask(), toy_config(), workdir)
    assert first.preempted and first.final_metrics == {}
    assert int(first.state.step) == preempt_at
    assert checkpoint_steps(workdir)[-1] == preempt_at
    assert [h["step"] for h in first.history] == list(range(1, preempt_at + 1))

    second = loop.train(ToyTask(), toy_config(), workdir)
    assert not second.preempted and int(second.state.step) == 10
    assert [h["step"] for h in second.history if "loss" in h] == list(range(preempt_at + 1, 11))
    assert max_abs_diff(loop.params_to_host(second.state.params), loop.params_to_host(reference.state.params)) == 0
    ref_losses = {h["step"]: h["loss"] for h in reference.history if "loss" in h}
    got = {h["step"]: h["loss"] for h in first.history + second.history if "loss" in h}
    assert got == ref_losses
    assert second.final_metrics == reference.final_metrics


def test_loop_rejects_a_workdir_of_another_model(tmp_path):
    from vlcore.training import loop
    from vlcore.training.checkpointing import WorkdirError

    loop.train(ToyTask(), toy_config(num_steps=2), tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(WorkdirError, match="different model"):
        loop.train(ToyTask(width=2), toy_config(num_steps=2), tmp_path)
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# The slow cases share their runs, and start them as early as their inputs allow so that the
# subprocesses overlap (the cost is mostly single-threaded imports and compilation, on 2 cores):
#   config_error_runs (need no world) -> reference (generates the world, alone) -> long_runs
#   (interrupted runs driven by background threads) -> workdir_error_runs -> device_runs.


@pytest.fixture(scope="session")
def config_error_runs(start, session_dir) -> dict[str, Run]:
    """An unknown --config override, and a config file with a misspelled field."""
    directory = session_dir / "config_errors"
    directory.mkdir()
    bad_file = directory / "misspelled.py"
    bad_file.write_text(
        "import importlib.util\n"
        f"_spec = importlib.util.spec_from_file_location('two_tower_world', {str(CONFIG)!r})\n"
        "_module = importlib.util.module_from_spec(_spec)\n"
        "_spec.loader.exec_module(_module)\n\n\n"
        "def get_config(arg=None):\n"
        "    config = _module.get_config(arg)\n"
        "    config.optimizer.lrr = 1.0\n"
        "    return config\n"
    )
    return {
        "override": start(directory / "wd_override", ["--config.batch_sizee=8"]),
        "file": start(directory / "wd_file", [], config=f"{bad_file}:tiny"),
        "batch": start(directory / "wd_batch", ["--config.batch_size=6"], devices=4),
        "values": start(directory / "wd_values", ["--config.num_steps=-3", "--config.optimizer.schedule=cosin"]),
        "preset": start(directory / "wd_preset", [], config=f"{CONFIG}:nonexistent"),
        "no_file": start(directory / "wd_no_file", [], config=directory / "nope.py"),
    }


@pytest.fixture(scope="session")
def reference(start, session_dir, config_error_runs) -> Run:
    """The 1-device SHORT run; it also generates the session's tiny world (so it runs alone)."""
    return start(session_dir / "dev1", SHORT, devices=1).expect(0)


class InterruptedRun:
    """A LONG run interrupted by `sig` once `ready()` holds, then rerun with the same command.

    A background thread drives it (so it overlaps with the other cases) and records what the
    interrupted run left; `result()` waits for the rerun.
    """

    def __init__(self, start, workdir: Path, args: list[str], sig: int, ready):
        self.workdir, self.args, self.sig, self.ready, self._start = workdir, args, sig, ready, start
        self.first = start(workdir, args, log_name=f"{workdir.name}_1")
        self.rerun: Run | None = None
        self.error: str | None = None
        self.steps_left: list[int] = []  # checkpoint steps the interrupted run left
        self.logged_left: list[int] = []  # steps with a logged loss it left
        self.thread = threading.Thread(target=self._drive, daemon=True)
        self.thread.start()

    def _drive(self) -> None:
        try:
            self._interrupt_and_rerun()
        except Exception as e:  # noqa: BLE001 - reported by result()
            self.error = f"{type(e).__name__}: {e}"

    def _interrupt_and_rerun(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not self.ready(self.workdir):
            if self.first.proc.poll() is not None:
                self.error = f"the run ended (exit {self.first.proc.returncode}) before it was interrupted"
                return
            if time.monotonic() > deadline:
                self.first.kill()
                self.error = "timed out waiting for the moment to interrupt"
                return
            time.sleep(0.05)
        self.first.proc.send_signal(self.sig)
        try:
            self.first.returncode = self.first.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.first.kill()
            self.error = "the interrupted run did not stop"
            return
        self.steps_left = checkpoint_steps(self.workdir)
        self.logged_left = sorted(read_scalars(self.workdir).get("loss", {}))
        self.rerun = self._start(self.workdir, self.args, log_name=f"{self.workdir.name}_2")

    def result(self) -> "InterruptedRun":
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the interrupting thread hangs"
        assert self.error is None, f"{self.error}\n{self.first.tail()}"
        self.rerun.expect(0)
        return self


@pytest.fixture(scope="session")
def long_runs(start, session_dir, reference) -> dict[str, Any]:
    """The uninterrupted LONG reference, and the SIGTERM and SIGKILL cases (all started now)."""
    return {
        "reference": start(session_dir / "long_ref", LONG + ["--config.save_every=1000"]),
        # save_every=1000: the only checkpoint can come from the SIGTERM save.
        "sigterm": InterruptedRun(start, session_dir / "sigterm", LONG + ["--config.save_every=1000"],
                                  signal.SIGTERM, loss_logged),
        "sigkill": InterruptedRun(start, session_dir / "sigkill", LONG + ["--config.save_every=20"],
                                  signal.SIGKILL, checkpoint_steps),
    }


@pytest.fixture(scope="session")
def workdir_error_runs(start, session_dir, reference, long_runs) -> dict[str, Any]:
    """A work dir holding another model's checkpoint, and one under a regular file."""
    other = session_dir / "other_model"
    shutil.copytree(reference.workdir, other)
    (session_dir / "file.txt").write_text("not a directory\n")
    unwritable = session_dir / "file.txt" / "wd"
    return {
        "other_model": other,
        "other_model_before": snapshot(other),
        "other_model_json": (other / "model.json").read_bytes(),
        "other_model_run": start(other, [*SHORT, "--config.model.hidden_size=48"], log_name="other_model"),
        "unwritable": unwritable,
        "unwritable_run": start(unwritable, SHORT, log_name="unwritable"),
    }


@pytest.fixture(scope="session")
def device_runs(start, session_dir, reference, workdir_error_runs) -> dict[str, Run]:
    """SHORT on 2, 4 and 8 fake devices, and on 8 with fsdp=2 (concurrently)."""
    runs = {"dev1": reference}
    for name, devices, extra in [("dev2", 2, []), ("dev4", 4, []), ("dev8", 8, []),
                                 ("dev8_fsdp2", 8, ["--config.fsdp=2"])]:
        runs[name] = start(session_dir / name, SHORT + extra, devices=devices)
    for run in runs.values():
        run.expect(0)
    return runs


# ----------------------------------------------------------------------------------------------
# 1. The same global batch on 1, 2, 4, 8 devices (and FSDP) trains the same model


@pytest.mark.slow
def test_same_training_on_1_2_4_8_devices_and_fsdp(device_runs):
    ref = device_runs["dev1"]
    assert checkpoint_steps(ref.workdir) == [2, 4]  # every save_every=2 steps, no others
    assert max_abs_diff(restore_state(ref.workdir, 2)["params"], restore_state(ref.workdir, 4)["params"]) > 1e-4
    for name, run in device_runs.items():
        if name == "dev1":
            continue
        assert_params_close(run.workdir, ref.workdir, atol=1e-5, skip=zero_gradient_param)
        assert_same_scalars(run.workdir, ref.workdir, rtol=1e-5, atol=1e-5, tags={"loss", "lr", "grad_norm"})
    # FSDP really sharded some of the state; pure data parallelism replicated all of it.
    def specs(name):
        sharding = json.loads((device_runs[name].workdir / "checkpoints/4/default/_sharding").read_text())
        return [json.loads(v) if isinstance(v, str) else v for v in sharding.values()]
    assert any("fsdp" in (s.get("partition_spec") or []) for s in specs("dev8_fsdp2"))
    assert all(not s.get("partition_spec") for s in specs("dev8"))


# ----------------------------------------------------------------------------------------------
# 5. - 7. Bad configs and work dirs stop early, with a clear message


@pytest.mark.slow
def test_unknown_config_fields(config_error_runs):
    override, from_file = config_error_runs["override"], config_error_runs["file"]
    override.expect(2)  # a config error like any other, not a traceback
    assert "error:" in override.stderr and "batch_sizee" in override.stderr and '"batch_size"' in override.stderr
    assert "Traceback" not in override.stderr
    from_file.expect(2)
    assert "error:" in from_file.stderr
    assert "config.optimizer.lrr" in from_file.stderr and "did you mean config.optimizer.lr?" in from_file.stderr
    assert not override.workdir.exists() and not from_file.workdir.exists()
    batch = config_error_runs["batch"]  # a global batch that does not split over 4 devices
    batch.expect(2)
    assert "error: config.batch_size 6 is not divisible by the device count 4" in batch.stderr
    assert "Traceback" not in batch.stderr


@pytest.mark.slow
def test_bad_config_values_presets_and_files_are_one_line_errors(config_error_runs):
    """Every way a config can be wrong ends before anything runs: one `error:` line, exit 2."""
    expected = {
        "values": ["config.num_steps=-3: expected an integer >= 1",
                   "config.optimizer.schedule='cosin': expected 'cosine', 'linear' or 'constant'"],
        "preset": ["unknown preset 'nonexistent'", "'default', 'quick', 'tiny'"],
        "no_file": ["--config: no such config file", "nope.py"],
    }
    for name, parts in expected.items():
        run = config_error_runs[name].expect(2)
        errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and all(part in errors[0] for part in parts), (name, run.stderr[-2000:])
        assert "Traceback" not in run.stderr and "FATAL" not in run.stderr, name
        assert not run.workdir.exists(), name


@pytest.mark.slow
def test_workdir_of_a_different_model_is_refused(workdir_error_runs, reference):
    workdir = workdir_error_runs["other_model"]
    run = workdir_error_runs["other_model_run"].expect(2)
    assert "error:" in run.stderr and "different model" in run.stderr and str(workdir) in run.stderr
    assert snapshot(workdir) == workdir_error_runs["other_model_before"]  # nothing written, nothing removed
    assert (workdir / "model.json").read_bytes() == workdir_error_runs["other_model_json"]
    assert checkpoint_steps(workdir) == checkpoint_steps(reference.workdir) == [2, 4]


@pytest.mark.slow
def test_unwritable_workdir(workdir_error_runs):
    run = workdir_error_runs["unwritable_run"].expect(2)
    assert "error:" in run.stderr and str(workdir_error_runs["unwritable"]) in run.stderr


# ----------------------------------------------------------------------------------------------
# 4. Several processes


@pytest.mark.slow
def test_two_processes_match_one_process(start, session_dir, device_runs):
    workdir, port = session_dir / "proc2x2", free_port()
    dist = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    runs = [start(workdir, SHORT + dist + [f"--process_id={i}"], devices=2, log_name=f"proc2x2_{i}")
            for i in range(2)]
    try:
        for run in runs:
            run.expect(0)
    finally:
        for run in runs:
            run.kill()
    four = device_runs["dev4"].workdir
    assert_params_close(workdir, four, atol=1e-5, skip=zero_gradient_param)
    assert_same_scalars(workdir, four, rtol=1e-5, atol=1e-5, tags={"loss", "lr", "grad_norm"})
    # Both processes agree on the evaluation of the final model.
    assert runs[0].final_metrics() == runs[1].final_metrics()


# ----------------------------------------------------------------------------------------------
# 2. and 3. Resuming after SIGTERM and after SIGKILL gives the uninterrupted result


def assert_resumed_like_reference(case: InterruptedRun, resumed_from: int, ref: Run) -> None:
    files = event_files(case.workdir)
    assert len(files) == 2, files
    first_logged = min(step for step, _ in read_file_scalars(files[-1])["loss"])
    assert first_logged == resumed_from + 1, f"the rerun logged from step {first_logged}, not {resumed_from + 1}"
    assert checkpoint_steps(case.workdir)[-1] == LONG_STEPS
    assert_params_close(case.workdir, ref.workdir, atol=1e-6)
    assert_same_scalars(case.workdir, ref.workdir)  # every tag, every logged step, equal
    assert sorted(read_scalars(case.workdir)["loss"]) == list(range(1, LONG_STEPS + 1))
    assert case.rerun.final_metrics() == ref.final_metrics()


@pytest.mark.slow
def test_resume_after_sigterm(long_runs):
    case = long_runs["sigterm"].result()
    assert case.first.returncode == 143, case.first.tail()
    # save_every=1000: the one checkpoint is the SIGTERM save, of the last step logged.
    assert len(case.steps_left) == 1 and 0 < case.steps_left[0] < LONG_STEPS, case.steps_left
    assert case.logged_left == list(range(1, case.steps_left[0] + 1))
    assert_resumed_like_reference(case, case.steps_left[0], long_runs["reference"].expect(0))


@pytest.mark.slow
def test_resume_after_sigkill(long_runs):
    case = long_runs["sigkill"].result()
    assert case.first.returncode == -signal.SIGKILL
    assert case.steps_left and all(s % 20 == 0 for s in case.steps_left) and case.steps_left[-1] < LONG_STEPS
    assert_resumed_like_reference(case, case.steps_left[-1], long_runs["reference"].expect(0))


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(start, session_dir, device_runs):
    """A preemption notice reaching one host only: JAX's preemption service tells the other, both
    save the same step (Orbax's reached_preemption) and exit 143; rerun, they finish the run."""
    workdir = session_dir / "proc2_sigterm"

    def launch(tag: str) -> list[Run]:
        dist = [f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2"]
        return [start(workdir, LONG + ["--config.save_every=1000"] + dist + [f"--process_id={i}"], devices=1,
                      log_name=f"proc2_sigterm_{tag}{i}") for i in range(2)]

    first = launch("first")
    try:
        deadline = time.monotonic() + TIMEOUT
        while not loss_logged(workdir):  # training has started on both (the step is collective)
            assert first[0].proc.poll() is None and time.monotonic() < deadline, first[0].tail()
            time.sleep(0.05)
        first[1].proc.send_signal(signal.SIGTERM)
        for run in first:
            run.expect(143)
    finally:
        for run in first:
            run.kill()
    [saved] = checkpoint_steps(workdir)  # save_every=1000: this is the preemption save, one step for both
    assert 0 < saved < LONG_STEPS
    second = launch("second")
    try:
        for run in second:
            run.expect(0)
    finally:
        for run in second:
            run.kill()
    assert checkpoint_steps(workdir)[-1] == LONG_STEPS
    assert sorted(read_scalars(workdir)["loss"]) == list(range(1, LONG_STEPS + 1))  # resumed at saved + 1
    assert second[0].final_metrics() == second[1].final_metrics()


@pytest.mark.parametrize("extra, message", [
    (["--auto_distributed"], "--auto_distributed: JAX found no cluster to join"),
    (["--auto_distributed", "--coordinator_address=127.0.0.1:1234"],
     "--auto_distributed and --coordinator_address exclude each other"),
    (["--workdir=gs://bucket/wd"], "workdir gs://bucket/wd: a work dir must be a local or mounted path"),
])
def test_distributed_flags_and_workdir_urls_are_one_line_errors(tmp_path, extra, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "vlcore.main", f"--config={CONFIG}:tiny",
                           f"--workdir={tmp_path / 'wd'}", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert not (tmp_path / "wd").exists()
