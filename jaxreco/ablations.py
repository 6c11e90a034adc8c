"""The paper's ablations of RECO in one command: every variant trained, evaluated and tabled.

    python -m jaxreco.ablations --out out/ablations.json                  # embedded world, quick, all
    python -m jaxreco.ablations --variants=main --out out/reco.json         # what the main job runs
    python -m jaxreco.ablations --config=configs/reco_world.py:tiny --out /tmp/a.json
    python -m jaxreco.ablations --config=configs/reco_hf_clip.py --out cars.json --variants=frozen,reco

Variants (paper, §4.3 and Table 5-7); `--variants=main` is the first six, `all` (the default) every one:
  frozen              the frozen two-tower model, no retrieval
  reco                uni-modal search, cross-modal fusion (the method), k from the config
  cross_modal_search  image queries search texts (and text queries images)
  uni_modal_fusion    uni-modal search returning the same modality
  mean_fusion         the mean of the retrieved embeddings added to the query, no training
  mlp                 an MLP of the fusion's size on the query alone (no retrieval), trained the same way
  reco_k1 ... k20     RECO with k in {1, 5, 10, 20}
  memory_swap         the trained RECO, evaluated with another memory
  memory_enlarged     the trained RECO, evaluated with the memory plus the other one

Each trained variant has its own work dir under --workdir (default: beside --out), so a rerun
resumes an interrupted sweep and skips finished variants. Writes --out (JSON rows and the paired
comparisons), a markdown table beside it (.md) and two plots (.k.png: accuracy against k;
.bars.png: per-variant bars). Below the table it prints how sure RECO's lead is over the mean of
the neighbours, the same-size MLP and the frozen model: the paired difference of fine-grained
top-1 hits on the same test images, with its standard error and a bootstrap interval.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vlcore.atomic_files import atomic_write_text

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "reco_world.py")
MAIN_VARIANTS = ("frozen", "reco", "cross_modal_search", "uni_modal_fusion", "mean_fusion", "mlp")
VARIANTS = MAIN_VARIANTS + ("reco_k1", "reco_k5", "reco_k10", "reco_k20", "memory_swap", "memory_enlarged")
VARIANT_SETS = {"main": MAIN_VARIANTS, "all": VARIANTS}
# i2t/t2i: only the image side refined (the paper's choice for retrieval); both_: the text side too.
COLUMNS = ("fine_acc1", "fine_acc5", "coarse_acc1", "i2t_r1", "t2i_r1", "both_i2t_r1", "both_t2i_r1")
COMPARED = ("mean_fusion", "mlp", "cross_modal_search", "uni_modal_fusion", "frozen")  # RECO against each

_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "RECO config (configs/*.py[:preset])",
                                          lock_config=False)
_OUT = flags.DEFINE_string("out", None, "JSON file to write (.md and .png files go beside it)")
_WORKDIR = flags.DEFINE_string("workdir", None, "work dirs of the trained variants (default: <out stem>_runs)")
_VARIANTS = flags.DEFINE_list("variants", ["all"], "variants to run: names, or 'main' / 'all'")
flags.mark_flags_as_required(["out"])

log = logging.getLogger(__name__)


def variant_config(base, variant: str):
    """The config a trained variant runs with (None for evaluation-only variants)."""
    config = base.copy_and_resolve_references()
    config.name = variant
    if variant in ("reco", "memory_swap", "memory_enlarged"):
        pass
    elif variant in ("cross_modal_search", "uni_modal_fusion"):
        config.retrieval.mode = variant
    elif variant == "mlp":
        config.fusion.kind = "mlp"
    elif variant.startswith("reco_k"):
        config.fusion.k = int(variant[len("reco_k"):])
    else:
        return None
    return config


def run_dir_of(variant: str, base) -> str:
    """reco_k{k} with the base k is the same run as reco; memory_* evaluate the reco run."""
    if variant in ("memory_swap", "memory_enlarged") or variant == f"reco_k{base.fusion.k}":
        return "reco"
    return variant


def run_variants(base, variants, workdir: Path) -> list[dict[str, Any]]:
    from jaxreco.evaluate import FROZEN, Refiner
    from jaxreco.fusion import mean_fusion
    from jaxreco.task import RecoTask, make_artefacts
    from vlcore.training.loop import train

    artefacts = make_artefacts(base)
    rows, trained, hits = [], {}, {}
    for variant in variants:
        start = time.perf_counter()
        print(f"[ablations] {variant} ...", flush=True)
        run = run_dir_of(variant, base)
        if variant in ("frozen", "mean_fusion"):
            task = RecoTask(base, artefacts)
            refiner = FROZEN if variant == "frozen" else Refiner(_numpy(mean_fusion), _numpy(mean_fusion))
            metrics = task.evaluate(None, refiner=refiner)
            hits[variant] = task.last_per_example
        else:
            if run not in trained:
                config = variant_config(base, run)
                task = RecoTask(config, artefacts)
                result = train(task, config, workdir / run)
                if result.preempted:
                    raise KeyboardInterrupt("preempted: rerun the same command to resume the sweep")
                trained[run] = (task, result.state.params, result.final_metrics, task.last_per_example)
            task, params, final, final_hits = trained[run]
            if variant in ("memory_swap", "memory_enlarged"):
                metrics = task.evaluate(params, memory_name=variant.split("_")[1])
                hits[variant] = task.last_per_example
            else:
                metrics, hits[variant] = final, final_hits
        rows.append({"variant": variant, **{k: float(v) for k, v in metrics.items()},
                     "seconds": round(time.perf_counter() - start, 1)})
        print(f"[ablations] {variant}: " + ", ".join(f"{k}={rows[-1].get(k, float('nan')):.3f}" for k in COLUMNS),
              flush=True)
    return rows, hits


def comparisons(hits: dict[str, dict[str, np.ndarray]], task: str = "fine") -> list[dict[str, Any]]:
    """RECO against each other variant run: the paired difference of `task`'s top-1 hits."""
    from vlcore.paired_stats import paired_difference

    key = f"{task}_hit1"
    if key not in hits.get("reco", {}):
        return []
    out = []
    for other in COMPARED:
        if key in hits.get(other, {}):
            d = paired_difference(hits["reco"][key], hits[other][key])
            out.append({"a": "reco", "b": other, "metric": f"{task}_acc1", **dataclasses.asdict(d),
                        "text": f"reco - {other}, {task} acc@1: {d.describe()}"})
    return out


def _numpy(fn):
    return lambda q, nb: np.asarray(fn(q, nb))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    present = {k for r in rows for k in r}
    # The world's columns, then the headline metric of any other zero-shot task (real data).
    columns = [c for c in COLUMNS if c in present] + sorted(k for k in present if k.endswith("_acc1") and k not in COLUMNS)
    lines = ["| variant | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(f"{r[c]:.3f}" if c in r else "" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], stem: Path, metric: str = "fine_acc1") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {r["variant"]: r for r in rows}
    paths = []
    ks = [(0, "frozen")] + [(k, f"reco_k{k}") for k in (1, 5, 10, 20)]
    points = [(k, by_name[v][metric]) for k, v in ks if v in by_name and metric in by_name[v]]
    if len(points) >= 2:  # a curve needs the k sweep (--variants=all), not the frozen row alone
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([k for k, _ in points], [a for _, a in points], "o-")
        ax.set_xlabel("k retrieved neighbours (0 = frozen, no retrieval)")
        ax.set_ylabel(metric)
        ax.set_title("RECO: accuracy against k")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(stem.with_suffix(".k.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    bars = [(r["variant"], r[metric]) for r in rows if metric in r]
    if bars:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.bar([v for v, _ in bars], [a for _, a in bars], color=["grey" if v == "frozen" else "tab:blue" for v, _ in bars])
        ax.set_ylabel(metric)
        ax.set_title("RECO ablations")
        ax.tick_params(axis="x", rotation=45)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
        fig.tight_layout()
        paths.append(stem.with_suffix(".bars.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def selected_variants(names: list[str]) -> list[str]:
    """--variants: names, 'main' or 'all', in the canonical order; unknown names raise InputError."""
    from vlcore.variant_sets import select_variants

    return select_variants(names, VARIANTS, VARIANT_SETS)


def main(argv: list[str]) -> int:
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    out = Path(_OUT.value)
    if not out.parent.is_dir():
        print(f"error: --out: directory {out.parent} does not exist", file=sys.stderr)
        return 2
    from jaxreco import task as reco_task
    from vlcore.errors import InputError
    from vlcore.training.config_check import validate_config

    config = _CONFIG.value
    workdir = Path(_WORKDIR.value or out.with_name(out.stem + "_runs"))
    try:
        variants = selected_variants(_VARIANTS.value)
        validate_config(config, reco_task)
        rows, hits = run_variants(config, variants, workdir)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    compared = comparisons(hits)
    atomic_write_text(out, json.dumps({"rows": rows, "comparisons": compared, "config": config.to_dict()},
                                      indent=2, default=str) + "\n")
    table = markdown_table(rows)
    notes = "".join(f"\n- {c['text']}" for c in compared)
    atomic_write_text(out.with_suffix(".md"), table + (notes + "\n" if notes else ""))
    paths = plot(rows, out)
    print(table + notes)
    print("wrote " + ", ".join(str(p) for p in [out, out.with_suffix(".md"), *paths]))
    return 0


if __name__ == "__main__":
    from vlcore.training.config_check import parse_flags

    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
