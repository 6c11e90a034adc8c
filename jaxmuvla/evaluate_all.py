"""Every µ-VLA pre-training variant fine-tuned and evaluated on the four downstream tasks, in one command.

    python -m jaxmuvla.evaluate_all --out out/muvla_downstream.json                      # main: 3 variants
    python -m jaxmuvla.evaluate_all --variants=all --seeds=0,1 --out out/muvla_downstream.json

For each variant of `jaxmuvla.pretrain_sweep` (no_pretraining, round_robin, muvla and the
ablations), the pre-training work dir under --pretrained (default <out stem>_pretrain_runs; a
`pretrain_sweep`'s <out stem>_runs works too) is trained first when it is missing or unfinished; then each task of --tasks is fine-tuned from it with each seed of
--seeds in its own work dir (<workdir>/<variant>/<task>/seed<s>). A finished fine-tuning leaves
`scores.json` (its metrics) there and is skipped on a rerun, so an interrupted sweep resumes.

Writes --out (JSON: every run's metrics, and the paired comparisons: µ-VLA against no
pre-training and against the round robin, K = 5 against K = 1, µ-VLA against each ablation, each
with its paired standard error and bootstrap interval over the test examples), a markdown table
(.md) and a bar chart (.png).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vlcore.atomic_files import atomic_output, atomic_write_json, atomic_write_text

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "muvla_finetune_world.py")
TASK_ORDER = ("vqa", "nlvr2", "ve", "refcoco")
COLUMN_NAMES = {"vqa/test": "VQA", "nlvr2/test": "NLVR2", "ve/test": "VE", "refcoco/testA": "RefCOCO+ testA",
                "refcoco/testB": "RefCOCO+ testB"}
# comparisons reported: (a, b, what it tests)
COMPARISONS = (
    ("muvla", "no_pretraining", "pre-training through retrieval vs none"),
    ("muvla", "round_robin", "µ-VLA vs U-VisualBERT's round robin"),
    ("muvla", "k1", "K = 5 vs K = 1 retrieved sentences"),
    ("muvla", "k10", "K = 5 vs K = 10"),
    ("muvla", "no_region_tag", "with vs without R-T"),
    ("muvla", "no_region_phrase", "with vs without R-N"),
    ("muvla", "no_image_sentence", "with vs without I-S"),
    ("muvla", "no_curriculum", "with vs without the ITM curriculum"),
)

_FLAGS: dict[str, Any] = {}


def define_flags() -> None:
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "fine-tuning config (configs/muvla_finetune_world.py[:TASK,PRESET]); its "
        "pretrain field is the pre-training config of every variant", lock_config=False)
    _FLAGS["out"] = flags.DEFINE_string("out", None, "JSON file to write (.md and .png go beside it)")
    _FLAGS["pretrained"] = flags.DEFINE_string("pretrained", None, "pre-training work dirs, one per variant "
                                               "(default: <out stem>_pretrain_runs)")
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "fine-tuning work dirs (default: <out stem>_runs)")
    _FLAGS["variants"] = flags.DEFINE_list("variants", ["main"], "pre-training variants: names, 'main' or 'all'")
    _FLAGS["tasks"] = flags.DEFINE_list("tasks", list(TASK_ORDER), "downstream tasks")
    _FLAGS["seeds"] = flags.DEFINE_list("seeds", ["0"], "fine-tuning seeds (each a run of every variant x task)")
    _FLAGS["more_seeds"] = flags.DEFINE_list("more_seeds", [], "further fine-tuning seeds for --more_seeds_variants only "
                                             "(e.g. a second seed of the µ-VLA vs no-pre-training gap)")
    _FLAGS["more_seeds_variants"] = flags.DEFINE_list("more_seeds_variants", ["no_pretraining", "muvla"],
                                                      "the variants --more_seeds applies to")
    flags.mark_flags_as_required(["out"])


def score_columns(task: str) -> tuple[str, ...]:
    return ("testA", "testB") if task == "refcoco" else ("test",)


def pretrained_dir(pretrained: Path, variant: str) -> Path | None:
    return None if variant == "no_pretraining" else pretrained / variant


def ensure_pretrained(base_pretrain, variant: str, directory: Path | None) -> None:
    """Pre-trains `variant` into `directory` unless its final checkpoint is there."""
    if directory is None:
        return
    from jaxmuvla.pretrain import PretrainTask
    from jaxmuvla.pretrain_sweep import variant_config
    from vlcore.training.loop import train

    config = variant_config(base_pretrain, variant)
    if latest_step(directory) == config.num_steps:
        return
    print(f"[muvla] pre-training {variant} ...", flush=True)
    result = train(PretrainTask(config), config, directory)
    if result.preempted:
        raise KeyboardInterrupt("preempted: rerun the same command to resume")


def latest_step(directory: Path) -> int | None:
    import orbax.checkpoint as ocp

    if not (directory / "checkpoints").is_dir():
        return None
    manager = ocp.CheckpointManager((directory / "checkpoints").absolute())
    try:
        return manager.latest_step()
    finally:
        manager.close()


def finetune_config(base, variant: str, task: str, seed: int, init: Path | None):
    from jaxmuvla.pretrain_sweep import variant_config

    config = base.copy_and_resolve_references()
    config.pretrain = variant_config(base.pretrain, variant)
    config.downstream = task
    config.name = f"{variant}/{task}/seed{seed}"
    config.seed = seed
    config.init = str(init) if init is not None else ""
    return config


def run_one(base, variant: str, task: str, seed: int, pretrained: Path, workdir: Path) -> dict[str, Any]:
    """Fine-tunes and evaluates one (variant, task, seed), or reads its finished result."""
    from jaxmuvla.finetune import FinetuneTask
    from vlcore.training.loop import train

    done = workdir / "scores.json"
    if done.is_file():
        return json.loads(done.read_text())
    start = time.perf_counter()
    config = finetune_config(base, variant, task, seed, pretrained_dir(pretrained, variant))
    task_obj = FinetuneTask(config, workdir)
    result = train(task_obj, config, workdir)
    if result.preempted:
        raise KeyboardInterrupt("preempted: rerun the same command to resume")
    row = {"variant": variant, "task": task, "seed": seed, **result.final_metrics,
           "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(done, row, indent=2)  # last: its presence means the run is finished
    return row


def per_example(workdir: Path, split: str) -> np.ndarray:
    return np.asarray(json.loads((workdir / "results" / f"{split}.scores.json").read_text())["score"], np.float64)


def comparisons(rows: list[dict[str, Any]], workdir: Path, tasks: list[str]) -> list[dict[str, Any]]:
    """Paired differences (a - b) on the same test examples, per task and split, with the per-example
    scores averaged over the seeds both variants were fine-tuned with, and per seed."""
    from vlcore.paired_stats import paired_difference

    seeds_of: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        seeds_of.setdefault((r["variant"], r["task"]), []).append(r["seed"])
    out = []
    for a, b, what in COMPARISONS:
        for task in tasks:
            seeds = sorted(set(seeds_of.get((a, task), [])) & set(seeds_of.get((b, task), [])))
            if not seeds:
                continue
            for split in score_columns(task):
                runs_a = [per_example(workdir / a / task / f"seed{s}", split) for s in seeds]  # each file read once
                runs_b = [per_example(workdir / b / task / f"seed{s}", split) for s in seeds]
                d = paired_difference(np.mean(runs_a, 0), np.mean(runs_b, 0))
                per_seed = [float(np.mean(x) - np.mean(y)) for x, y in zip(runs_a, runs_b)]
                out.append({"a": a, "b": b, "what": what, "task": task, "split": split, "seeds": seeds,
                            "difference": d.difference, "standard_error": d.standard_error, "ci_low": d.ci_low,
                            "ci_high": d.ci_high, "n": d.n, "per_seed": per_seed})
    return out


def summary_table(rows: list[dict[str, Any]], tasks: list[str]) -> tuple[list[str], dict[str, dict[str, tuple]]]:
    """(columns, {variant: {column: (mean over seeds, spread over seeds, seeds)}})."""
    columns = [f"{t}/{s}" for t in tasks for s in score_columns(t)]
    table: dict[str, dict[str, tuple]] = {}
    for r in rows:
        for s in score_columns(r["task"]):
            table.setdefault(r["variant"], {}).setdefault(f"{r['task']}/{s}", []).append(r[f"{s}_accuracy"])
    return columns, {v: {c: (float(np.mean(x)), float(np.std(x)), len(x)) for c, x in cols.items()}
                     for v, cols in table.items()}


def markdown(rows, comps, tasks, variants) -> str:
    columns, table = summary_table(rows, tasks)
    names = COLUMN_NAMES
    lines = ["| variant | " + " | ".join(names.get(c, c) for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for v in variants:
        if v not in table:
            continue
        cells = []
        for c in columns:
            if c in table[v]:
                mean, _, n = table[v][c]
                cells.append(f"{100 * mean:.1f}" + (f" ({n} seeds)" if n > 1 else ""))
            else:
                cells.append("")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences on the same test examples (points; SE and bootstrap 95 % CI over the "
              "examples; per-example scores averaged over the shared seeds):", "",
              "| comparison | task | difference | SE | 95 % CI | per seed |", "|---|---|---:|---:|---|---|"]
    for c in comps:
        lines.append(f"| {c['a']} − {c['b']} | {names.get(c['task'] + '/' + c['split'])} | "
                     f"{100 * c['difference']:+.1f} | {100 * c['standard_error']:.1f} | "
                     f"[{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}] | "
                     + ", ".join(f"{100 * d:+.1f}" for d in c["per_seed"]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, tasks, variants, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns, table = summary_table(rows, tasks)
    present = [v for v in variants if v in table]
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(columns), 3.4))
    width = 0.8 / max(len(present), 1)
    for i, v in enumerate(present):
        means = [100 * table[v].get(c, (np.nan,))[0] for c in columns]
        spread = [100 * table[v].get(c, (0, 0))[1] for c in columns]
        ax.bar(np.arange(len(columns)) + (i - (len(present) - 1) / 2) * width, means, width, yerr=spread,
               label=v, color=f"C{i}", capsize=2)
    ax.set_xticks(np.arange(len(columns)), [COLUMN_NAMES.get(c, c) for c in columns])
    ax.set_ylabel("accuracy (%)")
    low = np.nanmin([100 * table[v][c][0] for v in present for c in columns if c in table[v]])
    ax.set_ylim(max(0, low - 10), 100)
    ax.legend(fontsize=7, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("µ-VLA downstream on the embedded world (error bars: spread over seeds)", fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    out = Path(_FLAGS["out"].value)
    if not out.parent.is_dir():
        print(f"error: --out: directory {out.parent} does not exist", file=sys.stderr)
        return 2
    from jaxmuvla import finetune
    from jaxmuvla.pretrain_sweep import selected_variants
    from vlcore.errors import InputError
    from vlcore.training.config_check import validate_config

    config = _FLAGS["config"].value
    pretrained = Path(_FLAGS["pretrained"].value or out.with_name(out.stem + "_pretrain_runs"))
    workdir = Path(_FLAGS["workdir"].value or out.with_name(out.stem + "_runs"))
    rows = []
    try:
        variants = selected_variants(_FLAGS["variants"].value)
        tasks = [t for t in TASK_ORDER if t in _FLAGS["tasks"].value]
        unknown = sorted(set(_FLAGS["tasks"].value) - set(TASK_ORDER))
        if unknown or not tasks:
            raise InputError(f"--tasks {unknown or _FLAGS['tasks'].value}: expected some of {list(TASK_ORDER)}")
        try:
            seeds = [int(s) for s in _FLAGS["seeds"].value]
            more = [int(s) for s in _FLAGS["more_seeds"].value if int(s) not in seeds]
        except ValueError:
            raise InputError(f"--seeds {_FLAGS['seeds'].value} / --more_seeds {_FLAGS['more_seeds'].value}: expected "
                             "integers") from None
        validate_config(config, finetune)
        import jax

        # the variants of one task compile the same programs: XLA's persistent cache compiles them once
        jax.config.update("jax_compilation_cache_dir", str((workdir / "jax_cache").absolute()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        for variant in variants:
            ensure_pretrained(config.pretrain, variant, pretrained_dir(pretrained, variant))
            for task in tasks:
                for seed in seeds + (more if variant in _FLAGS["more_seeds_variants"].value else []):
                    row = run_one(config, variant, task, seed, pretrained, workdir / variant / task / f"seed{seed}")
                    rows.append(row)
                    print(f"[muvla] {variant} {task} seed {seed}: " + ", ".join(
                        f"{s} {100 * row[f'{s}_accuracy']:.1f}" for s in score_columns(task)) +
                        f" ({row['seconds']:.0f} s)", flush=True)
        comps = comparisons(rows, workdir, tasks)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_write_text(out, json.dumps({"rows": rows, "comparisons": comps, "config": config.to_dict()}, indent=2,
                                      default=str) + "\n")
    table = markdown(rows, comps, tasks, variants)
    atomic_write_text(out.with_suffix(".md"), table)
    png = plot(rows, tasks, variants, out.with_suffix(".png"))
    print(table)
    print(f"wrote {out}, {out.with_suffix('.md')}, {png}")
    return 0


if __name__ == "__main__":
    from vlcore.training.config_check import parse_flags

    define_flags()
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
