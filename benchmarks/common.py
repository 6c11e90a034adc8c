"""What every benchmark script shares: timing, the device line, atomic JSON output."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import jax


def median_seconds(fn: Callable[[], object], iters: int) -> float:
    """Median wall time of `iters` calls; `fn` must block until its work is done."""
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_description() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{d.device_kind} x{jax.device_count()}"


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)  # never leaves a half-written result


def print_table(rows: list, columns: list[tuple[str, str, str]]) -> None:
    """Prints dataclass rows. columns: (header, attribute, format spec), the spec starting with
    its alignment and width, e.g. ("model", "model", "<36") or ("speedup", "speedup", ">7.2f")."""
    def header_spec(spec: str) -> str:
        return spec[0] + spec[1:].split(".")[0].rstrip("defgs")  # alignment + width only

    header = " ".join(f"{name:{header_spec(spec)}}" for name, _, spec in columns)
    print(header)
    print("-" * len(header))
    for r in rows:
        print(" ".join(f"{getattr(r, attr):{spec}}" for _, attr, spec in columns))
