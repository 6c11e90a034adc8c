"""Every µ-VLA pre-training variant fine-tuned and evaluated on the four downstream tasks, in one command.

    python -m jaxmuvla.evaluate_all --out out/muvla_downstream.json                      # main variants
    python -m jaxmuvla.evaluate_all --variants=all --out out/muvla_downstream.json       # + the ablations

For each variant of `jaxmuvla.pretrain_sweep` (no_pretraining, aligned, round_robin, muvla and the
ablations), the pre-training work dir under --pretrained (default <out stem>_pretrain_runs; a
`pretrain_sweep`'s <out stem>_runs works too) is trained first when it is missing or unfinished,
and its final held-out metrics are kept beside its checkpoints (`pretrain_metrics.json`) for the
gates (`jaxmuvla.gates.gate_report`). Then, per task of --tasks, the protocol:

  1. the learning rate: every value of config.lr_grid fine-tuned with the first seed; the one with
     the best val score (each run's best step) is chosen (ties: the earlier grid value);
  2. that learning rate for every other seed: --seeds for no_pretraining, aligned, round_robin and
     muvla (default 3), --ablation_seeds for the others (default 2);
  3. in each run (`jaxmuvla.finetune`): the val split scored every config.eval_every steps, the
     test splits scored once with the best step's parameters.

Each run has its own work dir (<workdir>/<variant>/<task>/lr<lr>/seed<s>); a finished one leaves
`scores.json` (its metrics, best step and val curve) there and is skipped on a rerun, so an
interrupted sweep resumes.

Writes --out (JSON: every run's metrics, the learning-rate grids' val scores, each variant's gates,
and the comparisons: aligned vs µ-VLA, µ-VLA vs round robin, round robin vs none, µ-VLA vs none,
aligned vs none, K = 5 vs K = 1 and µ-VLA vs each ablation, each a difference of means with a
bootstrap interval that resamples the seeds of each variant and the test examples, paired on the
examples), a markdown table (.md) and a bar chart (.png). A variant whose pre-training failed a
gate is still fine-tuned, and marked in the table; a task on which aligned pre-training does not
beat none (interval excluding 0) is flagged "uninformative at this scale".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vlcore.atomic_files import atomic_output, atomic_write_json, atomic_write_text

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "muvla_finetune_world.py")
TASK_ORDER = ("vqa", "nlvr2", "ve", "refcoco")
COLUMN_NAMES = {"vqa/test": "VQA", "nlvr2/test": "NLVR2", "ve/test": "VE", "refcoco/testA": "RefCOCO+ testA",
                "refcoco/testB": "RefCOCO+ testB"}
SEEDED_VARIANTS = ("no_pretraining", "aligned", "round_robin", "muvla")  # --seeds; the others --ablation_seeds
# comparisons reported: (a, b, what it tests)
COMPARISONS = (
    ("aligned", "muvla", "aligned pre-training (the paper's upper bound) vs µ-VLA"),
    ("muvla", "round_robin", "µ-VLA vs U-VisualBERT's round robin"),
    ("round_robin", "no_pretraining", "round robin vs none"),
    ("muvla", "no_pretraining", "pre-training through retrieval vs none"),
    ("aligned", "no_pretraining", "aligned pre-training vs none: is the task informative at this scale?"),
    ("muvla", "k1", "K = 5 vs K = 1 retrieved sentences"),
    ("muvla", "k10", "K = 5 vs K = 10"),
    ("muvla", "no_region_tag", "with vs without R-T"),
    ("muvla", "no_region_phrase", "with vs without R-N"),
    ("muvla", "no_image_sentence", "with vs without I-S"),
    ("muvla", "no_curriculum", "with vs without the ITM curriculum"),
)
INFORMATIVE = ("aligned", "no_pretraining")  # a task is informative when a beats b with an interval excluding 0

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
    _FLAGS["seeds"] = flags.DEFINE_list("seeds", ["0", "1", "2"], "fine-tuning seeds of " + ", ".join(SEEDED_VARIANTS)
                                        + "; the first also picks the learning rate")
    _FLAGS["ablation_seeds"] = flags.DEFINE_list("ablation_seeds", ["0", "1"], "fine-tuning seeds of the other "
                                                 "variants (the ablations)")
    _FLAGS["more_seeds"] = flags.DEFINE_list("more_seeds", [], "further fine-tuning seeds for --more_seeds_variants only")
    _FLAGS["more_seeds_variants"] = flags.DEFINE_list("more_seeds_variants", ["no_pretraining", "muvla"],
                                                      "the variants --more_seeds applies to")
    _FLAGS["resamples"] = flags.DEFINE_integer("resamples", 10_000, "bootstrap resamples per comparison")
    flags.mark_flags_as_required(["out"])


def score_columns(task: str) -> tuple[str, ...]:
    return ("testA", "testB") if task == "refcoco" else ("test",)


def pretrained_dir(pretrained: Path, variant: str) -> Path | None:
    return None if variant == "no_pretraining" else pretrained / variant


PRETRAIN_METRICS = "pretrain_metrics.json"


def ensure_pretrained(base_pretrain, variant: str, directory: Path | None) -> dict[str, float] | None:
    """Pre-trains `variant` into `directory` unless it is finished; returns its final held-out metrics
    (kept in <directory>/pretrain_metrics.json: the loop returns them but does not write them). A
    finished run without that file is evaluated again (the loop restores its last step, trains
    nothing and evaluates). None for no pre-training."""
    if directory is None:
        return None
    from jaxmuvla.pretrain import PretrainTask
    from jaxmuvla.pretrain_eval import EVALUATION_VERSION
    from jaxmuvla.pretrain_sweep import variant_config
    from vlcore.training.loop import train

    config = variant_config(base_pretrain, variant)
    saved = directory / PRETRAIN_METRICS
    if latest_step(directory) == config.num_steps and saved.is_file():
        record = json.loads(saved.read_text())
        if record.get("step") == config.num_steps and record.get("evaluation") == EVALUATION_VERSION:
            return record["metrics"]  # else measured by an older evaluation: evaluated again
    print(f"[muvla] pre-training {variant} ...", flush=True)
    result = train(PretrainTask(config), config, directory)
    if result.preempted:
        raise KeyboardInterrupt("preempted: rerun the same command to resume")
    metrics = {k: float(v) for k, v in result.final_metrics.items()}
    atomic_write_json(saved, {"step": int(result.state.step), "evaluation": EVALUATION_VERSION, "metrics": metrics},
                      indent=2)
    return metrics


def latest_step(directory: Path) -> int | None:
    import orbax.checkpoint as ocp

    if not (directory / "checkpoints").is_dir():
        return None
    manager = ocp.CheckpointManager((directory / "checkpoints").absolute())
    try:
        return manager.latest_step()
    finally:
        manager.close()


def gate_status(metrics: dict[str, float] | None) -> dict[str, Any] | None:
    """The gates of a pre-training's final metrics (`jaxmuvla.gates.gate_report`); None for no pre-training."""
    if metrics is None:
        return None
    from jaxmuvla.gates import gate_report

    return gate_report(metrics)


def gate_note(report: dict[str, Any] | None) -> str:
    """The table's mark: "" when every gate passed, else what failed or was not measured."""
    if report is None:
        return ""
    failed = [name for name, g in report["gates"].items() if not g["passed"]]
    notes = []
    if failed:
        notes.append("gates failed: " + ", ".join(failed))
    if report.get("missing"):
        notes.append("gates not measured: " + ", ".join(report["missing"]))
    if not report["gates"] and not notes:
        notes.append("no gates measured")
    return f"({'; '.join(notes)})" if notes else ""


def finetune_config(base, variant: str, task: str, seed: int, init: Path | None, lr: float | None = None):
    from jaxmuvla.pretrain_sweep import variant_config

    config = base.copy_and_resolve_references()
    config.pretrain = variant_config(base.pretrain, variant)
    config.downstream = task
    config.name = f"{variant}/{task}/seed{seed}"
    config.seed = seed
    config.init = str(init) if init is not None else ""
    if lr is not None:
        config.optimizer.lr = float(lr)
    return config


def learning_rates(config) -> list[float]:
    """config.lr_grid, or optimizer.lr alone when the grid is empty."""
    return [float(x) for x in config.lr_grid] or [float(config.optimizer.lr)]


def run_dir(workdir: Path, variant: str, task: str, lr: float, seed: int) -> Path:
    return workdir / variant / task / f"lr{lr:g}" / f"seed{seed}"


def run_one(base, variant: str, task: str, seed: int, pretrained: Path, workdir: Path,
            lr: float | None = None) -> dict[str, Any]:
    """Fine-tunes and evaluates one (variant, task, seed, lr), or reads its finished result."""
    from jaxmuvla.finetune import FinetuneTask
    from vlcore.training.loop import train

    done = workdir / "scores.json"
    if done.is_file():
        return json.loads(done.read_text())
    start = time.perf_counter()
    config = finetune_config(base, variant, task, seed, pretrained_dir(pretrained, variant), lr)
    task_obj = FinetuneTask(config, workdir)
    result = train(task_obj, config, workdir)
    if result.preempted:
        raise KeyboardInterrupt("preempted: rerun the same command to resume")
    metrics = dict(result.final_metrics)
    curve_file = workdir / "val_curve.json"
    curve = json.loads(curve_file.read_text()) if task_obj.val is not None else None
    row = {"variant": variant, "task": task, "seed": seed, "lr": float(config.optimizer.lr),
           "dropout": task_obj.module.config.hidden_dropout_prob, **metrics,
           "best_step": int(metrics["best_step"]), "val_split": task_obj.val_split,
           "val_curve": {"steps": curve["steps"], "val_accuracy": curve["val_accuracy"]} if curve else None,
           "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(done, row, indent=2)  # last: its presence means the run is finished
    return row


def choose_lr(val_scores: dict[float, float], grid: Sequence[float]) -> float:
    """The grid value with the best val score; ties go to the earlier grid value."""
    return max(grid, key=lambda lr: (val_scores[lr], -list(grid).index(lr)))


def run_variant_task(config, variant: str, task: str, seeds: list[int], pretrained: Path, workdir: Path,
                     report=print) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The protocol for one (variant, task): every grid lr with seeds[0], the best by val, then the
    other seeds with it. Returns (the chosen lr's runs, the grid's record)."""
    grid = learning_rates(config)
    tried = {}
    for lr in grid:
        tried[lr] = run_one(config, variant, task, seeds[0], pretrained, run_dir(workdir, variant, task, lr, seeds[0]),
                            lr)
        report(tried[lr])
    val = {lr: r.get("selected_val_accuracy", float("nan")) for lr, r in tried.items()}
    if len(grid) > 1 and any(np.isnan(v) for v in val.values()):
        from vlcore.errors import InputError

        raise InputError(f"config.lr_grid {grid}: choosing a learning rate needs a val split ({task} has none here)")
    chosen = choose_lr(val, grid)
    rows = [tried[chosen]]
    for seed in seeds[1:]:
        rows.append(run_one(config, variant, task, seed, pretrained, run_dir(workdir, variant, task, chosen, seed),
                            chosen))
        report(rows[-1])
    return rows, {"variant": variant, "task": task, "seed": seeds[0], "chosen": chosen,
                  "grid": [{"lr": lr, "val_accuracy": val[lr], "best_step": tried[lr]["best_step"]} for lr in grid]}


def per_example(workdir: Path, split: str) -> np.ndarray:
    return np.asarray(json.loads((workdir / "results" / f"{split}.scores.json").read_text())["score"], np.float64)


# --- intervals over seeds and examples -------------------------------------------------------------


def bootstrap_replicates(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0,
                         chunk: int = 1_000) -> np.ndarray:
    """a [seeds_a, n], b [seeds_b, n]: per-example scores of two variants' fine-tuning seeds on the
    same n test examples -> [resamples] replicates of mean(a) - mean(b). Each replicate draws the
    seeds of a and of b with replacement (independently: a seed of one variant is no pair of the
    other's) and n examples with replacement, the same examples for both (paired on examples)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[1] < 2:
        raise ValueError(f"bootstrap_replicates: need [seeds, n] arrays over the same n >= 2 examples, got "
                         f"{a.shape}, {b.shape}")
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    out = []
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        seeds_a = rng.multinomial(len(a), np.full(len(a), 1 / len(a)), size=r) / len(a)  # [r, seeds_a] weights
        seeds_b = rng.multinomial(len(b), np.full(len(b), 1 / len(b)), size=r) / len(b)
        examples = rng.multinomial(n, np.full(n, 1 / n), size=r) / n  # [r, n] weights
        out.append(((seeds_a @ a - seeds_b @ b) * examples).sum(1))
    return np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class SeedExampleInterval:
    difference: float  # mean over seeds and examples of a, minus b's
    ci_low: float  # 2.5th and 97.5th percentiles of the replicates
    ci_high: float
    standard_error: float  # the replicates' standard deviation
    num_seeds_a: int
    num_seeds_b: int
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0


def seed_example_interval(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0) -> SeedExampleInterval:
    """The difference of means of a [seeds_a, n] and b [seeds_b, n] with its bootstrap 95 % interval
    over seeds and examples (`bootstrap_replicates`)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    reps = bootstrap_replicates(a, b, resamples, seed)
    low, high = np.percentile(reps, [2.5, 97.5])
    return SeedExampleInterval(float(a.mean() - b.mean()), float(low), float(high), float(reps.std(ddof=1)),
                               len(a), len(b), a.shape[1])


def comparisons(rows: list[dict[str, Any]], workdir: Path, tasks: list[str],
                resamples: int = 10_000) -> list[dict[str, Any]]:
    """Each comparison of COMPARISONS whose two variants were run, per task and split: a − b over
    every seed of each (at its chosen learning rate) and the same test examples."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        runs.setdefault((r["variant"], r["task"]), []).append(r)
    out = []
    for a, b, what in COMPARISONS:
        for task in tasks:
            if (a, task) not in runs or (b, task) not in runs:
                continue
            for split in score_columns(task):
                scores = {v: np.stack([per_example(run_dir(workdir, v, task, r["lr"], r["seed"]), split)
                                       for r in runs[(v, task)]]) for v in (a, b)}
                d = seed_example_interval(scores[a], scores[b], resamples)
                out.append({"a": a, "b": b, "what": what, "task": task, "split": split,
                            "seeds_a": [r["seed"] for r in runs[(a, task)]],
                            "seeds_b": [r["seed"] for r in runs[(b, task)]], **dataclasses.asdict(d),
                            "excludes_zero": d.excludes_zero,
                            "per_seed_a": [float(x) for x in scores[a].mean(1)],
                            "per_seed_b": [float(x) for x in scores[b].mean(1)]})
    return out


def informativeness(comps: list[dict[str, Any]], tasks: list[str]) -> dict[str, str]:
    """{task/split: "informative" | "uninformative at this scale" | "not checked (...)"}: informative
    when aligned pre-training beats none with an interval excluding 0."""
    a, b = INFORMATIVE
    found = {f"{c['task']}/{c['split']}": c for c in comps if (c["a"], c["b"]) == (a, b)}
    out = {}
    for column in (f"{t}/{s}" for t in tasks for s in score_columns(t)):
        c = found.get(column)
        if c is None:
            out[column] = f"not checked (needs {a} and {b})"
        else:
            out[column] = "informative" if c["difference"] > 0 and c["excludes_zero"] else "uninformative at this scale"
    return out


# --- output --------------------------------------------------------------------------------------------


def summary_table(rows: list[dict[str, Any]], tasks: list[str]) -> tuple[list[str], dict[str, dict[str, tuple]]]:
    """(columns, {variant: {column: (mean over seeds, spread over seeds, seeds)}})."""
    columns = [f"{t}/{s}" for t in tasks for s in score_columns(t)]
    table: dict[str, dict[str, list]] = {}
    for r in rows:
        for s in score_columns(r["task"]):
            table.setdefault(r["variant"], {}).setdefault(f"{r['task']}/{s}", []).append(r[f"{s}_accuracy"])
    return columns, {v: {c: (float(np.mean(x)), float(np.std(x)), len(x)) for c, x in cols.items()}
                     for v, cols in table.items()}


def markdown(rows, comps, tasks, variants, gates: dict[str, Any] | None = None,
             lr_choices: list[dict[str, Any]] | None = None) -> str:
    gates = gates or {}
    columns, table = summary_table(rows, tasks)
    names = COLUMN_NAMES
    informative = informativeness(comps, tasks)
    lines = ["Accuracy (%) on the test splits with the best-val step's parameters, mean ± spread over the "
             "fine-tuning seeds; gates: the pre-training's (`jaxmuvla.gates`).", "",
             "| variant | gates | " + " | ".join(names.get(c, c) for c in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for v in variants:
        if v not in table:
            continue
        report = gates.get(v)
        gate_cell = "n/a (not pre-trained)" if report is None else (gate_note(report) or "passed")
        cells = []
        for c in columns:
            if c in table[v]:
                mean, spread, n = table[v][c]
                cells.append(f"{100 * mean:.1f}" + (f" ± {100 * spread:.1f} ({n} seeds)" if n > 1 else ""))
            else:
                cells.append("")
        lines.append(f"| {v} | {gate_cell} | " + " | ".join(cells) + " |")  # the verdict once, in its column
    lines += ["", f"Is the task informative at this scale ({INFORMATIVE[0]} − {INFORMATIVE[1]} > 0, its 95 % "
              "interval excluding 0)?", ""]
    lines += [f"- {names.get(c, c)}: {informative[c]}" for c in columns]
    if lr_choices:
        lines += ["", "Learning rate per (variant, task), chosen by the best val score with seed "
                  f"{lr_choices[0]['seed']} (val accuracy % at each run's best step):", "",
                  "| variant | task | " + " | ".join(f"lr {g['lr']:g}" for g in lr_choices[0]["grid"]) + " | chosen |",
                  "|---|---|" + "---:|" * len(lr_choices[0]["grid"]) + "---:|"]
        for ch in lr_choices:
            lines.append(f"| {ch['variant']} | {ch['task']} | " + " | ".join(
                f"{100 * g['val_accuracy']:.1f} (step {g['best_step']})" for g in ch["grid"]) + f" | {ch['chosen']:g} |")
    lines += ["", "Differences of means (points) on the same test examples; 95 % interval of a bootstrap that "
              "resamples each variant's fine-tuning seeds and the test examples (paired on examples):", "",
              "| comparison | task | difference | 95 % CI | seeds | per seed a / b |", "|---|---|---:|---|---|---|"]
    for c in comps:
        column = f"{c['task']}/{c['split']}"
        flag = " (uninformative at this scale)" if informative.get(column) == "uninformative at this scale" else ""
        lines.append(f"| {c['a']} − {c['b']} | {names.get(column, column)}{flag} | "
                     f"{100 * c['difference']:+.1f} | [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}] | "
                     f"{c['seeds_a']} / {c['seeds_b']} | "
                     + ", ".join(f"{100 * x:.1f}" for x in c["per_seed_a"]) + " / "
                     + ", ".join(f"{100 * x:.1f}" for x in c["per_seed_b"]) + " |")
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


def seeds_of(variant: str, seeds: list[int], ablation_seeds: list[int], more: list[int], more_variants) -> list[int]:
    base = seeds if variant in SEEDED_VARIANTS else ablation_seeds
    return list(dict.fromkeys(base + (more if variant in more_variants else [])))


def print_run(row: dict[str, Any]) -> None:
    print(f"[muvla] {row['variant']} {row['task']} lr {row['lr']:g} seed {row['seed']}: best step {row['best_step']}"
          + (f" (val {100 * row['selected_val_accuracy']:.1f})" if "selected_val_accuracy" in row else "") + ", "
          + ", ".join(f"{s} {100 * row[f'{s}_accuracy']:.1f}" for s in score_columns(row["task"]))
          + f" ({row['seconds']:.0f} s)", flush=True)


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
    rows, lr_choices, gates = [], [], {}
    try:
        variants = selected_variants(_FLAGS["variants"].value)
        tasks = [t for t in TASK_ORDER if t in _FLAGS["tasks"].value]
        unknown = sorted(set(_FLAGS["tasks"].value) - set(TASK_ORDER))
        if unknown or not tasks:
            raise InputError(f"--tasks {unknown or _FLAGS['tasks'].value}: expected some of {list(TASK_ORDER)}")
        try:
            seeds, ablation_seeds, more = ([int(s) for s in _FLAGS[f].value] for f in ("seeds", "ablation_seeds",
                                                                                       "more_seeds"))
        except ValueError:
            raise InputError(f"--seeds {_FLAGS['seeds'].value} / --ablation_seeds {_FLAGS['ablation_seeds'].value} / "
                             f"--more_seeds {_FLAGS['more_seeds'].value}: expected integers") from None
        if not seeds or not ablation_seeds:
            raise InputError("--seeds and --ablation_seeds: at least one seed each")
        validate_config(config, finetune)
        import jax

        # the variants of one task compile the same programs: XLA's persistent cache compiles them once
        jax.config.update("jax_compilation_cache_dir", str((workdir / "jax_cache").absolute()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        for variant in variants:
            gates[variant] = gate_status(ensure_pretrained(config.pretrain, variant,
                                                           pretrained_dir(pretrained, variant)))
            if gate_note(gates[variant]):
                print(f"[muvla] {variant}: {gate_note(gates[variant])}; fine-tuned anyway, marked in the table",
                      flush=True)
            for task in tasks:
                chosen, grid = run_variant_task(config, variant, task, seeds_of(
                    variant, seeds, ablation_seeds, more, _FLAGS["more_seeds_variants"].value), pretrained, workdir,
                    print_run)
                rows += chosen
                lr_choices.append(grid)
        comps = comparisons(rows, workdir, tasks, _FLAGS["resamples"].value)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_write_text(out, json.dumps({"rows": rows, "lr_selection": lr_choices, "gates": gates,
                                       "comparisons": comps, "informative": informativeness(comps, tasks),
                                       "config": config.to_dict()}, indent=2, default=str) + "\n")
    table = markdown(rows, comps, tasks, variants, gates, lr_choices)
    atomic_write_text(out.with_suffix(".md"), table)
    png = plot(rows, tasks, variants, out.with_suffix(".png"))
    print(table)
    print(f"wrote {out}, {out.with_suffix('.md')}, {png}")
    return 0


if __name__ == "__main__":
    from vlcore.training.config_check import parse_flags

    define_flags()
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
