"""The train-step benchmark against steps whose cost is known: FLOP accounting (also over several
devices), step timing, the matmul peak and MFU; then the real models' rows and the CLI's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from benchmarks import train_step
from conftest import assert_usage_error
from benchmarks.common import median_seconds

REPO = Path(__file__).resolve().parents[1]
ROW_KEYS = {"model", "devices", "batch", "step_s", "examples_per_s", "model_flops_per_s", "peak_flops_per_s", "mfu"}

# The known step: a dense layer x[M, K_IN] @ w[K_IN, N_OUT] trained on squared error, optionally
# slowed by CHAIN matmuls z[M, D] @ c[D, D] that get no gradient (so their FLOPs are forward only).
M, K_IN, N_OUT, D, CHAIN = 512, 256, 32, 512, 4
# Plain SGD: its elementwise update is a tiny fraction of the matmuls, so they dominate the count.
SGD = ml_collections.ConfigDict({"name": "sgd", "lr": 1e-3, "momentum": 0.0, "schedule": "constant"})
# Elementwise work (loss, SGD update, per device) is < 2% of the matmul FLOPs at these sizes.
FLOPS_RTOL = 0.03


def hand_flops(batch: int, chain: int) -> int:
    """FLOPs of one dense_step(chain) train step at this batch: 2*batch*K_IN*N_OUT for x @ w,
    the same for dL/dw = x^T @ dL/d(out) (no dL/dx: x is data), 2*batch*D*D per chain matmul."""
    return 4 * batch * K_IN * N_OUT + chain * 2 * batch * D * D


def slow_chain(z: jax.Array, c: jax.Array, chain: int) -> jax.Array:
    """`chain` matmuls [batch, D] x [D, D] (tanh keeps the values bounded); unrolled, because XLA's
    cost analysis counts a loop body once, whatever its trip count."""
    for _ in range(chain):
        z = jnp.tanh(z @ c)
    return z


def dense_step(chain: int):
    """A STEPS-style builder (batch, mesh) -> (init, loss_fn, inputs, optimizer, num_steps) of the
    known step; with chain > 0 the step also runs slow_chain on an extra input z[batch, D]."""
    def build(batch, mesh):
        rng = np.random.default_rng(0)
        inputs = {"x": rng.standard_normal((batch, K_IN)).astype(np.float32),
                  "y": rng.standard_normal((batch, N_OUT)).astype(np.float32)}
        if chain:
            inputs["z"] = rng.standard_normal((batch, D)).astype(np.float32)

        def init(key):
            params = {"w": jnp.zeros((K_IN, N_OUT))}
            if chain:
                params["c"] = jax.random.normal(key, (D, D)) / np.sqrt(D)
            return params

        def loss_fn(params, b):
            loss = jnp.mean((b["x"] @ params["w"] - b["y"]) ** 2)
            if chain:  # added to the loss so that XLA cannot drop it; stop_gradient: forward only
                loss += 1e-6 * jnp.mean(slow_chain(b["z"], jax.lax.stop_gradient(params["c"]), chain))
            return loss, {}

        return init, loss_fn, inputs, SGD, 1
    return build


def flops_per_step(row: train_step.Row) -> float:
    """The FLOPs per step a row implies (its FLOP/s times its step time)."""
    return row.model_flops_per_s * row.step_s


def best_seconds(fn, tries: int = 3) -> float:
    """Fastest of `tries` blocking calls of `fn`, after one warm-up (compilation) call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(tries):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def test_median_seconds_reports_the_median_of_known_sleeps():
    sleeps = [0.02, 0.005, 0.1, 0.03, 0.12]  # median 0.03; mean 0.055, min 0.005, first 0.02
    calls = iter(sleeps)
    seconds = median_seconds(lambda: time.sleep(next(calls)), len(sleeps))
    assert next(calls, None) is None  # called exactly `iters` times, no untimed extra call
    assert 0.03 <= seconds < 0.045  # sleep overshoots by < 15 ms even on a busy machine


def test_matmul_peak_matches_an_independently_timed_matmul():
    """A 2x error in the FLOP count (n**3 for 2 n**3) or a timer that does not wait for the result
    would fall outside [0.6, 1.6]; timing noise from other processes is why it may try 3 times."""
    n = 512
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    dot = jax.jit(jnp.dot)
    ratios = []
    for _ in range(3):
        independent = 2 * n**3 / best_seconds(lambda: dot(a, a), tries=5)
        ratios.append(train_step.matmul_peak(jnp.float32, n, iters=5) / independent)
        if 0.6 < ratios[-1] < 1.6:
            break
    assert 0.6 < ratios[-1] < 1.6, ratios


@pytest.mark.parametrize("chain", [0, CHAIN])
def test_flops_per_step_equal_the_hand_count(chain):
    row = train_step.measure("dense", M, 1, 1e9, build=dense_step(chain))
    assert (row.model, row.devices, row.batch) == ("dense", 1, M)
    assert flops_per_step(row) == pytest.approx(hand_flops(M, chain), rel=FLOPS_RTOL)


def device_flops() -> dict:
    """This process's FLOP accounting: a batch-sharded [M, K_IN] x [K_IN, N_OUT] matmul through
    compiled_flops, and the FLOPs per step the benchmark reports for dense_step(CHAIN)."""
    from vlcore.training.mesh import batch_sharding, make_mesh, replicated
    from vlcore.training.metrics import compiled_flops

    mesh = make_mesh()
    x = jax.device_put(np.ones((M, K_IN), np.float32), batch_sharding(mesh))
    w = jax.device_put(np.ones((K_IN, N_OUT), np.float32), replicated(mesh))
    matmul = compiled_flops(jax.jit(jnp.dot).lower(x, w).compile(), mesh.size)
    row = train_step.measure("dense", M, 1, 1e9, build=dense_step(CHAIN))
    return {"devices": row.devices, "matmul": matmul, "step": flops_per_step(row)}


def test_flops_per_step_do_not_change_with_the_device_count():
    """XLA reports the per-device cost of a partitioned program: the benchmark must scale it back
    to the whole step (a missing or doubled factor is off by 4x on 4 devices)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    four = json.loads(proc.stdout.strip().splitlines()[-1])
    assert four["devices"] == 4
    assert four["matmul"] == 2 * M * K_IN * N_OUT
    assert four["step"] == pytest.approx(hand_flops(M, CHAIN), rel=FLOPS_RTOL)
    assert four["step"] == pytest.approx(device_flops()["step"], rel=FLOPS_RTOL)  # this process: 1 device


@pytest.fixture(scope="module")
def slowed():
    """(row of dense_step(CHAIN) measured with a peak of 1 GFLOP/s, independent best time of its chain)."""
    row = train_step.measure("slowed", M, 5, 1e9, build=dense_step(CHAIN))
    z = jnp.asarray(np.random.default_rng(1).standard_normal((M, D)), jnp.float32)
    c = jnp.asarray(np.random.default_rng(2).standard_normal((D, D)) / np.sqrt(D), jnp.float32)
    chain = jax.jit(lambda z, c: slow_chain(z, c, CHAIN))
    return row, best_seconds(lambda: chain(z, c))


def test_step_time_includes_the_slow_part_of_the_step(slowed):
    """The chain is ~98% of the step's FLOPs: a timer that returns at dispatch (no block) reports
    microseconds, one that sums the 5 timed calls reports 5x."""
    row, chain_s = slowed
    assert 0.5 * chain_s <= row.step_s <= 3 * chain_s


def test_throughput_and_mfu_follow_from_the_known_flops_and_time(slowed):
    row, _ = slowed
    assert row.peak_flops_per_s == 1e9
    assert row.examples_per_s == pytest.approx(M / row.step_s)
    assert row.model_flops_per_s == pytest.approx(hand_flops(M, CHAIN) / row.step_s, rel=FLOPS_RTOL)
    assert row.mfu == pytest.approx(hand_flops(M, CHAIN) / row.step_s / 1e9, rel=FLOPS_RTOL)


@pytest.mark.parametrize("model", sorted(train_step.STEPS))
@pytest.mark.parametrize("batch", [4, 8])
def test_every_model_step_is_built_at_the_requested_batch(model, batch):
    """Every input the step consumes has the global batch as its leading dimension: a builder
    that ignored it would be timed on another batch than its row (and examples/s) claims."""
    from vlcore.training.mesh import make_mesh

    _, _, inputs, _, _ = train_step.STEPS[model](batch, make_mesh())
    assert inputs and {k: np.shape(v)[0] for k, v in inputs.items()} == {k: batch for k in inputs}


# the CLI test's models: every kind of row at the small sizes (the BERT-base rows take minutes)
CLI_MODELS = sorted(m for m in train_step.STEPS if not m.endswith("_base"))


def test_cli_writes_a_row_per_model_against_the_float32_peak(tmp_path, capsys):
    out = tmp_path / "r.json"
    models = CLI_MODELS
    assert train_step.main(["--models", ",".join(models), "--batches", "4", "--iters", "1", "--peak-n", "256",
                            "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["peak_flops_per_s"]) == {"float32", "bfloat16"}
    assert [(r["model"], r["batch"], r["devices"]) for r in result["rows"]] == [(m, 4, 1) for m in models]
    for row in result["rows"]:
        assert set(row) == ROW_KEYS
        assert row["peak_flops_per_s"] == result["peak_flops_per_s"]["float32"]  # MFU is against float32
        assert row["model_flops_per_s"] > 0  # XLA's cost analysis found the step's FLOPs
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split() == ["model", "devices", "batch", "step_s", "examples/s", "FLOP/s", "peak", "MFU"]
    assert [line.split()[:3] for line in printed[3:]] == [[m, "1", "4"] for m in models]


def test_torch_rows_time_the_same_size_model_and_pair_with_the_flax_rows(tmp_path, capsys):
    """The PyTorch reference rows: FLOPs from torch's counter agree with XLA's count of the
    like-for-like Flax VisualBERT step (same sizes, same inputs), and the printed ratio is the
    ratio of the two rows' step times."""
    out = tmp_path / "r.json"
    models = ["visualbert_world", "visualbert_world_torch", "muvla_world_torch"]
    assert train_step.main(["--models", ",".join(models), "--batches", "4", "--iters", "1", "--peak-n", "256",
                            "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["model"]: r for r in result["rows"]}
    flax, torch_row = rows["visualbert_world"], rows["visualbert_world_torch"]
    flops = lambda r: r["model_flops_per_s"] * r["step_s"]  # noqa: E731
    assert flops(torch_row) == pytest.approx(flops(flax), rel=0.15)
    assert flops(rows["muvla_world_torch"]) > 2.5 * flops(torch_row)  # three passes, one of them longer
    (ratio,) = result["torch_over_flax"]  # muvla_world has no Flax row here: no ratio for it
    assert ratio["model"] == "visualbert_world" and ratio["batch"] == 4
    assert ratio["torch_over_flax"] == pytest.approx(torch_row["step_s"] / flax["step_s"])
    assert f"PyTorch step / Flax step = {ratio['torch_over_flax']:.2f}" in capsys.readouterr().out


def test_the_flax_visualbert_step_has_transformers_loss():
    """hf_loss (the Flax like-for-like step's loss) equals transformers' VisualBertForPreTraining
    loss: cross-entropy over the labelled positions (-100 ignored) plus the 2-way ITM loss."""
    import torch

    from benchmarks.muvla_step import hf_loss

    rng = np.random.default_rng(0)
    logits, itm = rng.standard_normal((3, 7, 11)).astype(np.float32), rng.standard_normal((3, 2)).astype(np.float32)
    labels = np.where(rng.uniform(size=(3, 7)) < 0.4, rng.integers(0, 11, (3, 7)), -100)
    itm_labels = rng.integers(0, 2, 3)
    ce = torch.nn.CrossEntropyLoss()
    want = (ce(torch.from_numpy(logits).view(-1, 11), torch.from_numpy(labels).view(-1))
            + ce(torch.from_numpy(itm), torch.from_numpy(itm_labels))).item()
    assert float(hf_loss(jnp.asarray(logits), jnp.asarray(itm), jnp.asarray(labels), jnp.asarray(itm_labels))) \
        == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("args", [["--models", "nope"], ["--batches", "0"], ["--batches", "4,x"]])
def test_bad_arguments_exit_with_usage_error_and_no_output(tmp_path, args):
    out = tmp_path / "r.json"
    assert_usage_error(train_step.main, [*args, "--out", str(out)], out)


def test_missing_output_directory_is_a_usage_error():
    assert_usage_error(train_step.main, ["--out", "/nonexistent-dir/r.json"])


if __name__ == "__main__":  # the fake-device subprocess of test_flops_per_step_do_not_change_with_the_device_count
    print(json.dumps(device_flops()))
