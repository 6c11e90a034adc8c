"""RECO with its training neighbours searched on the devices inside the train step (retrieval.online).

Independent references: the precomputed path with the numpy exact index (retrieval.index="exact",
float64 scores, ties by lower id: the world's duplicate captions make exact ties) for the neighbours, the training and the evaluation; numpy brute force for the
recall of jax_approx. The 8-device and 2-process cases run this file as a script in subprocesses
(fake CPU devices need XLA_FLAGS before JAX starts, several processes their own interpreters);
they start as soon as the shared artefacts exist and overlap with the in-process cases.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 420  # seconds any one subprocess may take
STEPS = 6


def tiny_config(paths: dict, memory: str = "self", **retrieval):
    """The tiny preset on the session's world; memory "self" (the presets' self-retrieval, each pair's
    own entry excluded) or "other" (the world's memory split)."""
    sys.path.insert(0, str(REPO))
    from configs.reco_world import get_config

    config = get_config("tiny")
    config.encoder = f"two_tower:{paths['two_tower']}"
    config.data_dir = paths["tfds"]
    config.artefacts_dir = paths["artefacts"]
    config.log_every = 1
    config.save_every = STEPS
    config.async_checkpoints = False
    if memory == "other":
        [config.memory] = config.eval_memories.test_time
    config.retrieval.update(retrieval)
    return config


_ENCODERS: dict = {}


def make_task(config):
    """A RecoTask, its frozen encoder loaded once per process."""
    from jaxreco.task import RecoTask, make_artefacts
    from vlcore.frozen_encoders import load_frozen_encoder

    if config.encoder not in _ENCODERS:
        _ENCODERS[config.encoder] = load_frozen_encoder(config.encoder, batch_size=config.encode_batch_size)
    return RecoTask(config, make_artefacts(config, _ENCODERS[config.encoder]))


def precomputed_neighbours(task, thresholds: dict | None = None) -> dict[str, np.ndarray]:
    r = task.config.retrieval
    return task.artefacts.train_arrays(task.train_spec, task.memory_spec, r.mode, task.fusion.k,
                                       thresholds or {"image": 0.0, "text": 0.0})


def train_and_save(config, workdir: Path, out: Path) -> None:
    """Trains with vlcore.training.loop; process 0 writes the loss history, the final metrics and the
    parameters (numpy) to out.json / out.npz; every process writes its final metrics."""
    from vlcore.training.loop import params_to_host, train

    result = train(make_task(config), config, workdir)
    params = params_to_host(result.state.params)
    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    Path(f"{out}.metrics{jax.process_index()}.json").write_text(json.dumps(result.final_metrics))
    if jax.process_index() == 0:
        np.savez(f"{out}.npz", **flat)
        Path(f"{out}.json").write_text(json.dumps({"history": result.history, "final": result.final_metrics}))


def online_neighbours(config, fsdp: int, thresholds: dict | None = None) -> dict[str, np.ndarray]:
    """{side + "_ids", side + "_neighbours"} of every training pair, searched online on this process's mesh."""
    from jaxreco import online_retrieval
    from vlcore.training.mesh import make_mesh

    task = make_task(config)
    r = config.retrieval
    online = online_retrieval.build(task.artefacts, task.memory_spec, make_mesh(fsdp), r.mode,
                                    task.fusion.k, r.index, thresholds or {})
    batch = {**online_retrieval.train_arrays(task.artefacts, task.train_spec, task.memory_spec),
             **online.device_arrays()}
    out = {}
    for side in ("image", "text"):
        scores, rows, neighbours = jax.jit(lambda b, side=side: online.side(side, b))(batch)
        out[f"{side}_ids"], out[f"{side}_neighbours"] = online.memory.ids[np.asarray(rows)], np.asarray(neighbours)
        out[f"{side}_scores"] = np.asarray(scores)
    return out


def eval_neighbours(config) -> dict[str, np.ndarray]:
    """The evaluation memory's neighbours of the test split's images and captions, searched with the
    config's index (jaxreco.data.Memory, as jaxreco.evaluate does)."""
    from jaxreco.data import SplitSpec
    from retrieval.search import RECO_MODES

    task = make_task(config)
    memory = task.eval_memory()
    store = task.artefacts.store(SplitSpec.from_config(config.eval.retrieval[0]))
    out = {}
    for side in ("image", "text"):
        nb = memory.neighbours(np.asarray(store.embeddings(side), np.float32), task.fusion.k,
                               RECO_MODES[config.retrieval.mode][side])
        out[f"{side}_ids"], out[f"{side}_neighbours"] = nb.ids, nb.embeddings
    return out


def run_job(spec: dict) -> None:
    """A subprocess's work (see `jobs`): "devices8" or "processes2"."""
    paths, out = spec["paths"], Path(spec["out"])
    if spec["job"] == "processes2":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{spec['port']}", 2, spec["process_id"])
        train_and_save(tiny_config(paths, index="jax_exact", online=True), out / "online_2x2", out / "online_2x2")
        return
    assert jax.device_count() == 8
    results = {}
    for memory in ("self", "other"):
        config = tiny_config(paths, memory, index="jax_exact")
        for fsdp in (1, 2):
            results.update({f"{memory}_fsdp{fsdp}_{k}": v for k, v in online_neighbours(config, fsdp).items()})
    thresholds = spec["thresholds"]
    results.update({f"dup_{k}": v for k, v in
                    online_neighbours(tiny_config(paths, index="jax_exact"), 1, thresholds).items()})
    results.update({f"approx_{k}": v for k, v in
                    online_neighbours(tiny_config(paths, "other", index="jax_approx"), 2).items()})
    results.update({f"eval_{k}": v for k, v in eval_neighbours(tiny_config(paths, index="jax_exact")).items()})
    np.savez(out / "neighbours8.npz", **results)
    config = tiny_config(paths, index="jax_exact", online=True)
    config.eval.zero_shot, config.eval.retrieval = [], []  # the evaluation's search is compared above
    train_and_save(config, out / "online_8", out / "online_8")


# ----------------------------------------------------------------------------------------------
# Shared artefacts, in-process references, and the subprocess jobs


def gap_threshold(scores: np.ndarray, near: float) -> float:
    """A cosine near `near` at least 1e-5 from every score (so float rounding cannot move a score
    across it), on a 6-digit grid (the precompute names its directory with :g)."""
    values = np.unique(scores[np.isfinite(scores)].astype(np.float64))
    for t in sorted(np.round(near + np.arange(-2000, 2000) * 1e-6, 6), key=lambda t: abs(t - near)):
        if np.abs(values - t).min() > 1e-5:
            return float(t)
    raise AssertionError(f"no gap in the scores near {near}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world, a random frozen two-tower, and every artefact the cases read (stores, the exact
    and jax_exact indexes, the precomputed neighbours), built here once so no two processes race."""
    from conftest import make_two_tower_workdir
    from jaxreco.data import SplitSpec

    tmp = tmp_path_factory.mktemp("reco_online")
    workdir, _ = make_two_tower_workdir(tmp / "two_tower", seed=3)
    paths = {"two_tower": str(workdir), "tfds": str(tmp / "tfds"), "artefacts": str(tmp / "artefacts"), "tmp": str(tmp)}
    precomputed = {}
    for memory in ("self", "other"):
        task = make_task(tiny_config(paths, memory, index="exact"))
        precomputed[memory] = precomputed_neighbours(task)
    train = task.artefacts.store(task.train_spec)
    # Duplicate thresholds that drop a few neighbours of some pairs on each side.
    thresholds = {}
    for side, near in (("image", 0.995), ("text", 0.95)):
        e = np.asarray(train.embeddings(side), np.float32)
        thresholds[side] = gap_threshold(e @ e.T, near)
    task = make_task(tiny_config(paths, index="exact"))
    precomputed["dup"] = precomputed_neighbours(task, thresholds)
    for kind in ("exact", "jax_exact"):  # the evaluation memory's indexes, and the evaluation split
        make_task(tiny_config(paths, index=kind)).eval_memory()
    task.artefacts.store(SplitSpec.from_config(task.config.eval.retrieval[0]))
    return paths, precomputed, thresholds


class Job:
    def __init__(self, spec: dict, devices: int, log: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
        env.update(TF_CPP_MIN_LOG_LEVEL="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen([sys.executable, __file__, json.dumps(spec)], cwd=REPO, env=env,
                                         stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.started = time.monotonic()

    def expect_success(self) -> None:
        try:
            code = self.proc.wait(max(1.0, TIMEOUT - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"timed out: {self.log}\n{self.log.read_text(errors='replace')[-3000:]}")
        assert code == 0, self.log.read_text(errors="replace")[-4000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def jobs(world):
    """Started now, waited for by the cases that read them: 8 fake devices (neighbours, evaluation
    neighbours, a training run), and 2 processes x 2 devices (a training run)."""
    paths, _, thresholds = world
    out = Path(paths["tmp"]) / "jobs"
    out.mkdir()
    base = {"paths": paths, "out": str(out), "thresholds": thresholds}
    port = free_port()
    started = {"devices8": [Job({**base, "job": "devices8"}, 8, out / "devices8.log")],
               "processes2": [Job({**base, "job": "processes2", "port": port, "process_id": i}, 2,
                                  out / f"processes2_{i}.log") for i in range(2)]}
    yield out, started
    for group in started.values():
        for job in group:
            if job.proc.poll() is None:
                job.proc.kill()
                job.proc.wait()


def finished(jobs, name: str) -> Path:
    out, started = jobs
    for job in started[name]:
        job.expect_success()
    return out


@pytest.fixture(scope="module")
def reference(world, jobs):
    """The precomputed path (exact index) trained on 1 device in process: the reference of every run."""
    paths = world[0]
    out = Path(paths["tmp"]) / "precomputed_1"
    train_and_save(tiny_config(paths, index="exact"), out, out)
    return out


def load_run(out: Path) -> tuple[dict, dict, dict]:
    run = json.loads(Path(f"{out}.json").read_text())
    with np.load(f"{out}.npz") as params:
        return [h for h in run["history"] if "loss" in h], run["final"], dict(params)


def assert_same_training(got: Path, want: Path, atol: float, evaluated: bool = True) -> None:
    """Same logged steps, loss and gradient norm at every step, final parameters (and evaluation)."""
    from conftest import zero_gradient_param

    history, final, params = load_run(got)
    ref_history, ref_final, ref_params = load_run(want)
    assert [h["step"] for h in history] == [h["step"] for h in ref_history] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "logit_scale"):
        np.testing.assert_allclose([h[key] for h in history], [h[key] for h in ref_history], rtol=atol, atol=atol,
                                   err_msg=key)
    assert all(h["online_short_neighbours"] == 0.0 for h in history)  # every slot held an admissible row
    assert params.keys() == ref_params.keys()
    # The attention key bias (zero true gradient, see conftest.zero_gradient_param) is left out.
    checked = [k for k in params if not zero_gradient_param(k)]
    assert len(checked) >= len(params) - 2
    worst = max(checked, key=lambda k: np.abs(params[k] - ref_params[k]).max())
    assert np.abs(params[worst] - ref_params[worst]).max() <= atol, worst
    if not evaluated:
        return
    assert final.keys() == ref_final.keys() and final
    for key in final:
        assert final[key] == pytest.approx(ref_final[key], abs=1e-6), key


# ----------------------------------------------------------------------------------------------
# The cases


def test_online_training_on_1_device_equals_the_precomputed_path(world, reference):
    paths = world[0]
    out = Path(paths["tmp"]) / "online_1"
    train_and_save(tiny_config(paths, index="jax_exact", online=True), out, out)
    assert_same_training(out, reference, atol=1e-6)
    # It did train: the loss moved.
    history = load_run(out)[0]
    assert history[0]["loss"] != history[-1]["loss"]


def test_the_memory_enters_the_train_step_as_arguments_not_constants(world):
    """The loop passes `device_arrays` to the jitted step; closed over, JAX 0.10 would embed them
    in the program (a [90, 384] float32 constant prints as ~350,000 characters of HLO)."""
    import optax
    from flax.training import train_state

    from jaxreco.online_retrieval import MEMORY_PREFIX
    from vlcore.training.loop import make_train_step
    from vlcore.training.mesh import global_batch, make_mesh

    task = make_task(tiny_config(world[0], index="jax_exact", online=True))
    mesh = make_mesh(1)
    resident = task.device_arrays(mesh)
    assert sorted(resident) == [MEMORY_PREFIX + "image", MEMORY_PREFIX + "text"]
    state = train_state.TrainState.create(apply_fn=None, params=task.init_params(jax.random.key(0)),
                                          tx=optax.sgd(0.1))
    batch = global_batch({key: v[:16] for key, v in task.train_arrays().items()}, mesh)
    hlo = jax.jit(make_train_step(task, lambda step: 0.1, 0)).lower(state, batch, resident).as_text()
    [signature] = [line for line in hlo.splitlines() if "func.func public @main" in line]
    n, d = resident[MEMORY_PREFIX + "image"].shape
    assert signature.count(f"tensor<{n}x{d}xf32>") == 2
    assert max(len(line) for line in hlo.splitlines()) < n * d  # no constant of the memory's size


def test_online_neighbours_on_8_devices_equal_the_precomputed_ones(world, jobs):
    _, precomputed, thresholds = world
    with np.load(finished(jobs, "devices8") / "neighbours8.npz") as got:
        got = dict(got)
    for memory in ("self", "other"):
        want = precomputed[memory]
        for fsdp in (1, 2):
            for side in ("image", "text"):
                key = f"{memory}_fsdp{fsdp}_{side}"
                np.testing.assert_array_equal(got[f"{key}_ids"], want[f"{side}_neighbour_ids"], err_msg=key)
                np.testing.assert_array_equal(got[f"{key}_neighbours"], want[f"{side}_neighbours"], err_msg=key)
    self_ids = np.arange(len(precomputed["self"]["image"]))
    assert not (precomputed["self"]["image_neighbour_ids"] == self_ids[:, None]).any()  # own entry excluded...
    for side in ("image", "text"):  # ...and near-duplicates above the thresholds, some of them
        want = precomputed["dup"]
        np.testing.assert_array_equal(got[f"dup_{side}_ids"], want[f"{side}_neighbour_ids"], err_msg=side)
        np.testing.assert_array_equal(got[f"dup_{side}_neighbours"], want[f"{side}_neighbours"], err_msg=side)
        assert (got[f"dup_{side}_scores"] <= thresholds[side]).all()
        assert (want[f"{side}_neighbour_ids"] != precomputed["self"][f"{side}_neighbour_ids"]).any(), side


def test_evaluation_with_jax_exact_on_8_devices_searches_like_the_exact_index(world, jobs):
    """With retrieval.index="jax_exact" the evaluation memory is a JaxIndex (on-device search)."""

    paths = world[0]
    with np.load(finished(jobs, "devices8") / "neighbours8.npz") as got:
        got = dict(got)
    assert {type(i).__name__ for _, indexes in make_task(tiny_config(paths, index="jax_exact")).eval_memory().pieces
            for i in indexes.values()} == {"JaxIndex"}
    want = eval_neighbours(tiny_config(paths, index="exact"))
    for key, value in want.items():
        np.testing.assert_array_equal(got[f"eval_{key}"], value, err_msg=key)


def test_online_training_on_8_devices_equals_the_precomputed_path_on_1(jobs, reference):
    out = finished(jobs, "devices8")
    assert_same_training(out / "online_8", reference, atol=1e-5, evaluated=False)  # see the evaluation case


@pytest.mark.slow
def test_online_training_on_2_processes_equals_the_precomputed_path_on_1(jobs, reference):
    out = finished(jobs, "processes2")
    assert_same_training(out / "online_2x2", reference, atol=1e-5)
    # Both processes evaluated (each searching its share with its own JaxIndex) and agree.
    metrics = [json.loads((out / f"online_2x2.metrics{i}.json").read_text()) for i in range(2)]
    assert metrics[0] == metrics[1]


def test_jax_approx_recall_reaches_its_target(world, jobs):
    """On the tiny memory (8 devices, from the job) and on a larger random one (1 device, here),
    against numpy's exact top-k."""
    from jaxreco import online_retrieval
    from retrieval.backends import make_index, recall_at_k
    from retrieval.memory_store import MemoryStore
    from vlcore.training.mesh import make_mesh

    paths = world[0]
    with np.load(finished(jobs, "devices8") / "neighbours8.npz") as got:
        approx = {side: got[f"approx_{side}_ids"] for side in ("image", "text")}
    target = make_index("jax_approx").recall_target
    stores = sorted(Path(paths["artefacts"]).glob("*/stores/*"))
    train = MemoryStore.open(next(d for d in stores if "fusion_train" in d.name))
    memory = MemoryStore.open(next(d for d in stores if "-memory-" in d.name))
    k = approx["image"].shape[1]
    for side in ("image", "text"):
        scores = np.asarray(train.embeddings(side), np.float64) @ np.asarray(memory.embeddings(side), np.float64).T
        exact = memory.ids()[np.argsort(-scores, axis=1, kind="stable")[:, :k]]
        assert recall_at_k(approx[side], exact, k) >= target, side

    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    mem, queries = unit(rng.standard_normal((4096, 32))), unit(rng.standard_normal((64, 32)))
    mesh = make_mesh(1)
    for recall_target in (0.8, 0.95):
        _, rows, neighbours = jax.jit(lambda q, m, o: online_retrieval.search_memory(
            q, m, m, o, mesh=mesh, k=10, count=len(mem), approximate=True, recall_target=recall_target))(
            queries, mem, -np.ones(len(queries), np.int32))
        exact = np.argsort(-(queries.astype(np.float64) @ mem.T.astype(np.float64)), axis=1, kind="stable")[:, :10]
        assert recall_at_k(np.asarray(rows), exact, 10) >= recall_target
        np.testing.assert_array_equal(np.asarray(neighbours), mem[np.asarray(rows)])  # payload of the rows found


def test_bad_online_config_is_a_one_line_error(tmp_path):
    from jaxreco import task as reco_task
    from vlcore.training.config_check import ConfigError, validate_config

    sys.path.insert(0, str(REPO))
    from configs.reco_world import get_config

    for fusion_kind, index, problem in (("mlp", "jax_exact", "'mlp'"), ("transformer", "faiss_flat", "'faiss_flat'"),
                                        ("transformer", "exact", "'exact'")):
        config = get_config("tiny")
        config.fusion.kind, config.retrieval.index, config.retrieval.online = fusion_kind, index, True
        with pytest.raises(ConfigError) as e:
            validate_config(config, reco_task)
        assert "config.retrieval.online=True" in str(e.value) and problem in str(e.value)
        assert "\n" not in str(e.value)
        config.retrieval.online = False  # the same config precomputes
        validate_config(config, reco_task)
    for index in ("jax_exact", "jax_approx"):
        config = get_config("tiny")
        config.retrieval.index, config.retrieval.online = index, True
        validate_config(config, reco_task)
    # On the command line: exit status 2 and one "error:" line, before anything is built.
    proc = subprocess.run([sys.executable, "-m", "vlcore.main", "--config=configs/reco_world.py:tiny",
                           "--config.retrieval.online=True", f"--workdir={tmp_path / 'w'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "config.retrieval.online=True" in line and "'faiss_flat'" in line
    assert not (tmp_path / "w").exists()


if __name__ == "__main__":
    run_job(json.loads(sys.argv[1]))
