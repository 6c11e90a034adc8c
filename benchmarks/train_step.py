"""Train-step speed of every trainer, as a fraction of this machine's measured matmul peak (MFU).

    python -m benchmarks.train_step --out train_step.json
    python -m benchmarks.train_step --models two_tower --batches 64,256,1024

For each model and global batch size: the jitted, state-donating train step of the training core
on synthetic inputs of the real shapes, timed after compilation over all devices; model FLOPs
from XLA's cost analysis of the compiled step; and, in the same process, the dense-matmul peak
(a large jitted jnp.dot, float32 and bfloat16). MFU = model FLOP/s / float32 peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
import jax
import jax.numpy as jnp
import numpy as np
from flax.training import train_state

from benchmarks import muvla_step
from benchmarks.common import device_description, median_seconds, print_table, write_json
from vlcore.training.loop import make_optimizer
from vlcore.training.mesh import batch_sharding, make_mesh, replicated, state_shardings
from vlcore.training.metrics import compiled_flops


@dataclasses.dataclass
class Row:
    model: str
    devices: int
    batch: int
    step_s: float
    examples_per_s: float
    model_flops_per_s: float
    peak_flops_per_s: float
    mfu: float


def matmul_peak(dtype: jnp.dtype, n: int = 2048, iters: int = 5) -> float:
    """FLOP/s of a large jitted jnp.dot on the default device: the machine's practical peak."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dtype))
    jax.block_until_ready(dot(a, b))
    return 2 * n**3 / median_seconds(lambda: jax.block_until_ready(dot(a, b)), iters)


def two_tower_step(batch: int, mesh):
    """The two-tower (LiT-style) step: quick-preset image tower, locked 384-d text embeddings."""
    from vlcore.two_tower.model import TwoTower, two_tower_loss
    from vlcore.two_tower.task import default_config, vision_config

    config = default_config()
    module = TwoTower(vision_config(config.model), config.model.embed_dim)
    rng = np.random.default_rng(0)
    size = config.model.image_size
    text = rng.standard_normal((batch, config.model.embed_dim)).astype(np.float32)
    inputs = {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
              "text_embedding": text / np.linalg.norm(text, axis=1, keepdims=True)}
    init = lambda r: module.init(r, jnp.zeros((1, size, size, 3), jnp.uint8))["params"]  # noqa: E731
    return init, lambda p, b: two_tower_loss(module, p, b), inputs, config.optimizer, config.num_steps


def _reco_step(batch: int, fusion, config):
    from jaxreco.model import Reco, init_params, reco_batch_loss

    module = Reco(fusion, config.fusion.kind)
    rng = np.random.default_rng(0)

    def unit(*shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    inputs = {"image": unit(batch, fusion.dim), "text": unit(batch, fusion.dim),
              "image_neighbours": unit(batch, fusion.k, fusion.dim), "text_neighbours": unit(batch, fusion.k, fusion.dim)}
    init = lambda r: init_params(module, r, fusion.dim, fusion.k)  # noqa: E731
    return init, lambda p, b: reco_batch_loss(module, p, b), inputs, config.optimizer, config.num_steps


def reco_step(batch: int, mesh):
    """RECO's fusion step on the world (quick preset): frozen 384-d embeddings, k = 10 neighbours."""
    from jaxreco.task import default_config, fusion_config

    config = default_config()
    return _reco_step(batch, fusion_config(config, 384), config)


def reco_paper_step(batch: int, mesh):
    """RECO's fusion step at the paper's size: CLIP ViT-B/32 512-d embeddings, k = 10, 3.15M/fusion."""
    from jaxreco.fusion import PAPER_FUSION
    from jaxreco.task import default_config

    return _reco_step(batch, PAPER_FUSION, default_config())


STEPS = {"two_tower": two_tower_step, "reco": reco_step, "reco_paper": reco_paper_step, **muvla_step.STEPS}
DEFAULT_MODELS = ("two_tower", "reco", "reco_paper")  # µ-VLA's rows are slow at large batches: ask for them
TABLE = [("model", "model", "<12"), ("devices", "devices", ">7"), ("batch", "batch", ">6"),
         ("step_s", "step_s", ">8.4f"), ("examples/s", "examples_per_s", ">11.1f"),
         ("FLOP/s", "model_flops_per_s", ">10.3g"), ("peak", "peak_flops_per_s", ">10.3g"), ("MFU", "mfu", ">6.3f")]


def measure(name: str, batch: int, iters: int, peak: float, build=None) -> Row:
    """One row: the compiled train step of `name` at global batch `batch`, timed over all devices.

    build: (batch, mesh) -> (init, loss_fn, inputs, optimizer config, num_steps), as in STEPS;
    STEPS[name] when None. Tests pass steps whose FLOPs and time are known.
    """
    mesh = make_mesh()
    init, loss_fn, inputs, opt_cfg, num_steps = (build or STEPS[name])(batch, mesh)
    tx, _ = make_optimizer(opt_cfg, num_steps)
    make_state = lambda r: train_state.TrainState.create(apply_fn=None, params=init(r), tx=tx)  # noqa: E731
    shardings = state_shardings(jax.eval_shape(make_state, jax.random.key(0)), mesh)
    state = jax.jit(make_state, out_shardings=shardings)(jax.random.key(0))

    def step(state, batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        return state.apply_gradients(grads=grads), loss

    batch_arrays = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in inputs.items()}
    compiled = jax.jit(step, donate_argnums=(0,), in_shardings=(shardings, batch_sharding(mesh)),
                       out_shardings=(shardings, replicated(mesh))).lower(state, batch_arrays).compile()
    flops = compiled_flops(compiled, mesh.size)
    holder = {"state": state}

    def run():
        holder["state"], loss = compiled(holder["state"], batch_arrays)
        return loss

    run()  # warm-up
    seconds = median_seconds(lambda: jax.block_until_ready(run()), iters)
    return Row(name, mesh.size, batch, seconds, batch / seconds, flops / seconds, peak, flops / seconds / peak)


def measure_torch(name: str, batch: int, iters: int, peak: float) -> Row:
    """One row of a PyTorch reference step (`muvla_step.TORCH_STEPS`): FLOPs from torch's own
    counter, the time over torch's threads on the host, MFU against the same float32 peak."""
    kind, size = muvla_step.TORCH_STEPS[name].split("_", 1)
    seconds, flops = muvla_step.torch_step_seconds(kind, size, batch, iters)
    return Row(name, 1, batch, seconds, batch / seconds, flops / seconds, peak, flops / seconds / peak)


def speed_ratios(rows: list[Row]) -> list[dict]:
    """For every (Flax, PyTorch) pair of rows at one batch: PyTorch step time / Flax step time
    (> 1: the Flax step is faster)."""
    by_key = {(r.model, r.batch): r for r in rows}
    return [{"model": r.model[:-len("_torch")], "batch": r.batch,
             "torch_over_flax": r.step_s / by_key[(r.model[:-len("_torch")], r.batch)].step_s}
            for r in rows if r.model.endswith("_torch") and (r.model[:-len("_torch")], r.batch) in by_key]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    known = sorted([*STEPS, *muvla_step.TORCH_STEPS])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, from {known}")
    p.add_argument("--batches", default="64,256,1024", help="global batch sizes")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--peak-n", type=int, default=2048, help="size of the square matmul that measures the peak")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in known]
    if unknown:
        p.error(f"--models: unknown {unknown}; expected from {known}")
    try:
        batches = [int(b) for b in args.batches.split(",")]
        assert all(b > 0 and b % jax.device_count() == 0 for b in batches)
    except (ValueError, AssertionError):
        p.error(f"--batches: expected positive multiples of the device count {jax.device_count()}, got {args.batches!r}")
    if args.out is not None and not args.out.parent.is_dir():
        p.error(f"--out: directory {args.out.parent} does not exist")

    peak32, peak16 = matmul_peak(jnp.float32, args.peak_n), matmul_peak(jnp.bfloat16, args.peak_n)
    device = device_description()
    rows = [(measure_torch if m in muvla_step.TORCH_STEPS else measure)(m, b, args.iters, peak32)
            for m in models for b in batches]
    ratios = speed_ratios(rows)
    print(f"device: {device}; matmul peak float32 {peak32 / 1e9:.1f} GFLOP/s, bfloat16 {peak16 / 1e9:.1f} GFLOP/s")
    print_table(rows, TABLE)
    for r in ratios:
        print(f"{r['model']} at batch {r['batch']}: PyTorch step / Flax step = {r['torch_over_flax']:.2f}")
    if args.out is not None:
        write_json(args.out, {"device": device, "peak_flops_per_s": {"float32": peak32, "bfloat16": peak16},
                              "rows": [dataclasses.asdict(r) for r in rows], "torch_over_flax": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
