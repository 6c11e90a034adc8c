"""Scalars to TensorBoard event files, a progress bar, and throughput from the compiled step."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Mapping

import jax
from flax.metrics import tensorboard
from tqdm.auto import tqdm


def compiled_flops(compiled: Any, num_devices: int) -> float:
    """FLOPs of one call of a compiled (possibly SPMD-partitioned) function, over all devices.

    XLA's cost analysis describes the per-device program of a partitioned computation (checked:
    a [64,128]x[128,256] matmul split over 8 devices reports 1/8 of 2*64*128*256), so it is
    multiplied by the number of devices the program runs on.
    """
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax returned one dict per program
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0)) * num_devices


class MetricLogger:
    """Writes scalars (process 0 only) and keeps a progress bar with the latest values."""

    def __init__(self, workdir: Path, total_steps: int, start_step: int, desc: str = "train"):
        self.is_writer = jax.process_index() == 0
        self.writer = tensorboard.SummaryWriter(str(workdir / "tensorboard")) if self.is_writer else None
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True,
                        disable=not self.is_writer, file=sys.stderr, mininterval=1.0)
        self.history: list[dict[str, float]] = []

    def step_done(self) -> None:
        self.bar.update(1)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        self.history.append({"step": step, **scalars})
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.scalar(name, value, step)
            self.writer.flush()
        shown = {k: f"{v:.4g}" for k, v in scalars.items() if k in ("loss", "examples_per_s", "model_tflops_per_s")}
        self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


class Throughput:
    """Examples/s and model FLOP/s over each log interval (wall clock, steps completed)."""

    def __init__(self, global_batch: int, flops_per_step: float):
        self.global_batch, self.flops_per_step = global_batch, flops_per_step
        self._start, self._steps = time.perf_counter(), 0

    def step_done(self) -> None:
        self._steps += 1

    def read_and_reset(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        steps, self._steps, self._start = self._steps, 0, time.perf_counter()
        return {
            "steps_per_s": steps / elapsed,
            "examples_per_s": steps * self.global_batch / elapsed,
            "model_tflops_per_s": steps * self.flops_per_step / elapsed / 1e12,
        }
