"""µ-VLA's pre-training variants in one command: each trained in its own work dir and evaluated.

    python -m jaxmuvla.pretrain_sweep --config=configs/muvla_world.py --out out/muvla_pretrain.json
    python -m jaxmuvla.pretrain_sweep --variants=main --out out/muvla_pretrain.json      # what the main job runs

Variants (the paper's Table 4 and its baselines):
  no_pretraining   the BERT initialisation only (nothing trained; the downstream baseline)
  aligned          the paper's upper bound (aligned VLP): the same objectives on each image's own
                   caption instead of retrieved sentences (a corpus built with --sentences=aligned)
  round_robin      U-VisualBERT: text-only MLM batches of the corpus and image-only tag + region
                   batches in turn, no retrieval
  muvla            R-T + R-N + I-S with the ITM curriculum, K = 5
  no_region_tag, no_region_phrase, no_image_sentence, no_curriculum   µ-VLA without one part
  k1, k10          µ-VLA drawing from the first 1 or 10 retrieved sentences

Every variant is reported with its gates (`jaxmuvla.gates`): whether each granularity was
learned (MRC against the class prior, the grounding probe against chance, ITM AUC on random and
on hard pairs), to read before any downstream number.

Each trained variant has its own work dir under --workdir (default: beside --out), so a rerun
resumes an interrupted sweep and skips finished variants. Writes --out (JSON: every variant's
held-out losses and ITM AUC, and the training curves), a markdown table (.md) and the curves
(.curves.png); the work dirs hold the checkpoints the downstream tasks start from.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from vlcore.atomic_files import atomic_output, atomic_write_text

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "muvla_world.py")
MAIN_VARIANTS = ("no_pretraining", "round_robin", "muvla", "aligned")
VARIANTS = MAIN_VARIANTS + ("no_region_tag", "no_region_phrase", "no_image_sentence", "no_curriculum", "k1", "k10")
VARIANT_SETS = {"main": MAIN_VARIANTS, "all": VARIANTS}
COLUMNS = ("heldout_tag_mlm", "heldout_mrc", "heldout_mrfr", "heldout_phrase_mlm", "heldout_p_mrtc", "heldout_itm",
           "heldout_sentence_mlm", "itm_auc")
# the gates' numbers and the hit rates (jaxmuvla.gates), a second table
GATE_COLUMNS = ("mrc_prior_ce", "heldout_mrc", "heldout_mrc_acc", "heldout_tag_mlm_acc", "heldout_phrase_mlm_acc",
                "heldout_p_mrtc_acc", "grounding_chance", "grounding_acc", "itm_auc", "itm_auc_hard")

_FLAGS: dict[str, Any] = {}  # defined only when run as a command: importing this module defines no absl flags


def define_flags() -> None:
    _FLAGS["config"] = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG,
                                                       "µ-VLA config (configs/*.py[:preset])", lock_config=False)
    _FLAGS["out"] = flags.DEFINE_string("out", None, "JSON file to write (.md and .png files go beside it)")
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "work dirs of the variants (default: <out stem>_runs)")
    _FLAGS["variants"] = flags.DEFINE_list("variants", ["all"], "variants to run: names, or 'main' / 'all'")
    flags.mark_flags_as_required(["out"])


def variant_config(base, variant: str):
    """The config a variant trains with (no_pretraining: the base config, not trained)."""
    config = base.copy_and_resolve_references()
    config.name = variant
    o = config.objectives
    if variant == "round_robin":
        config.variant = "round_robin"
    elif variant.startswith("no_") and variant != "no_pretraining":
        if variant == "no_curriculum":
            o.curriculum_epochs = -1.0
        else:
            o[variant[len("no_"):]] = False
    elif variant in ("k1", "k10"):
        o.k = int(variant[1:])
    elif variant == "aligned":
        config.corpus.sentences = "aligned"
        config.corpus.dir = f"{config.corpus.dir}_aligned"  # another corpus: never the retrieved one's directory
    return config


def selected_variants(names: list[str]) -> list[str]:
    """--variants: names, 'main' or 'all', in the canonical order; unknown names raise InputError."""
    from vlcore.variant_sets import select_variants

    return select_variants(names, VARIANTS, VARIANT_SETS)


def run_variants(base, variants: list[str], workdir: Path) -> list[dict[str, Any]]:
    from jaxmuvla.pretrain import PretrainTask
    from vlcore.training.loop import train

    rows = []
    for variant in variants:
        start = time.perf_counter()
        print(f"[muvla] {variant} ...", flush=True)
        config = variant_config(base, variant)
        task = PretrainTask(config)
        if variant == "no_pretraining":
            metrics, history = task.evaluate(task.init_params(None)), []
        else:
            result = train(task, config, workdir / variant)
            if result.preempted:
                raise KeyboardInterrupt("preempted: rerun the same command to resume the sweep")
            metrics, history = result.final_metrics, result.history
        rows.append({"variant": variant, **{k: float(v) for k, v in metrics.items()}, "history": history,
                     "seconds": round(time.perf_counter() - start, 1)})
        print(f"[muvla] {variant}: " + ", ".join(f"{k}={metrics[k]:.3f}" for k in COLUMNS if k in metrics), flush=True)
        print(f"[muvla] {variant}: gates " + gate_line(metrics), flush=True)
    return rows


def gate_line(metrics: dict[str, Any]) -> str:
    """"passed" or "FAILED: region_tag, grounding" (and the gates that were not measured)."""
    from jaxmuvla.gates import gate_report

    report = gate_report(metrics)
    failed = [n for n, g in report["gates"].items() if not g["passed"]]
    text = "passed" if report["passed"] else "FAILED: " + ", ".join(failed)
    return text + (f" (not measured: {', '.join(report['missing'])})" if report["missing"] else "")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The held-out losses, then the gates' numbers with each variant's verdict."""
    def table(columns_of, extra=None):
        columns = [c for c in columns_of if any(c in r for r in rows)]
        head = ["variant", *(c.replace("heldout_", "") for c in columns), *([extra] if extra else [])]
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for r in rows:
            cells = [f"{r[c]:.3f}" if c in r else "" for c in columns] + ([gate_line(r)] if extra else [])
            lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    return table(COLUMNS) + "\nGates (jaxmuvla.gates):\n\n" + table(GATE_COLUMNS, "gates")


CURVES = ("loss", "tag_mlm", "mrc", "mrfr", "phrase_mlm", "p_mrtc", "itm", "sentence_mlm", "text_mlm", "itm_weight",
          "mrc_acc", "tag_mlm_acc", "phrase_mlm_acc", "p_mrtc_acc", "itm_acc")


def plot_curves(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """One panel per training metric (the total loss, each objective's loss, the ITM weight)
    against the step, a line per trained variant that has it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if r["history"]]
    names = [n for n in CURVES if any(n in h for r in trained for h in r["history"])]
    if not names:
        return None
    cols = 4
    fig, axes = plt.subplots((len(names) + cols - 1) // cols, cols, figsize=(3.2 * cols, 2.6 * ((len(names) + 3) // 4)),
                             squeeze=False)
    colours = {r["variant"]: f"C{i}" for i, r in enumerate(trained)}  # one colour per variant in every panel
    for ax, name in zip(axes.flat, names):
        for r in trained:
            # 0 exactly: the step had nothing to predict for this loss (the round robin's other
            # half, a batch without a masked region), not a perfect prediction
            points = [(h["step"], h[name]) for h in r["history"] if name in h and (h[name] != 0 or name == "itm_weight")]
            if points:
                ax.plot([p for p, _ in points], [v for _, v in points], label=r["variant"], lw=1,
                        color=colours[r["variant"]])
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("µ-VLA pre-training: training metrics (one batch at each logged step)", fontsize=10)
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
    from jaxmuvla import pretrain
    from vlcore.errors import InputError
    from vlcore.training.config_check import validate_config

    config = _FLAGS["config"].value
    workdir = Path(_FLAGS["workdir"].value or out.with_name(out.stem + "_runs"))
    try:
        variants = selected_variants(_FLAGS["variants"].value)
        validate_config(config, pretrain)
        rows = run_variants(config, variants, workdir)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_write_text(out, json.dumps({"rows": rows, "config": config.to_dict()}, indent=2, default=str) + "\n")
    table = markdown_table(rows)
    atomic_write_text(out.with_suffix(".md"), table)
    curves = plot_curves(rows, out.with_suffix(".curves.png"))
    print(table)
    print("wrote " + ", ".join(str(p) for p in [out, out.with_suffix(".md"), curves] if p))
    return 0


if __name__ == "__main__":
    from vlcore.training.config_check import parse_flags

    define_flags()
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
