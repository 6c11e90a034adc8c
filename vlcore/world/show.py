"""Writes a PNG grid of world examples: image (upscaled) with its boxes, caption and labels.

    python -m vlcore.world.show --data_dir DIR [--config quick] [--seed S] [--split web] \
        [--n 16] [--cols 4] [--prepare] --out grid.png

The figure is exactly (cols * CELL_W_PX) x (rows * CELL_H_PX) pixels. Exit status 2 with a message
naming the problem on bad arguments (unknown config or split, unwritable output, data not
prepared without --prepare).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
from pathlib import Path

CELL_W_IN, CELL_H_IN, DPI = 3.0, 4.0, 100
CELL_W_PX, CELL_H_PX = int(CELL_W_IN * DPI), int(CELL_H_IN * DPI)
UPSCALE = 4


def grid_size(n: int, cols: int) -> tuple[int, int]:
    """(width, height) in pixels of the grid for n examples in `cols` columns."""
    cols = max(1, min(cols, n))
    return cols * CELL_W_PX, math.ceil(n / cols) * CELL_H_PX


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlcore.world.show", description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", required=True, help="TFDS data_dir holding vl_world")
    p.add_argument("--config", default="quick", help="vl_world config (tiny, quick, default)")
    p.add_argument("--seed", type=int, default=None, help="world seed (default: the config's)")
    p.add_argument("--split", default="web")
    p.add_argument("--n", type=int, default=16, help="number of examples")
    p.add_argument("--cols", type=int, default=4)
    p.add_argument("--prepare", action="store_true", help="generate the data if it is not there")
    p.add_argument("--out", required=True, help="output PNG path")
    return p


class _Error(Exception):
    pass


def _check_out(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise _Error(f"--out must end in .png, got {path!r}")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise _Error(f"cannot write --out {path!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _Error(f"cannot write --out {path!r}: directory {str(parent)!r} is not writable")
    if out.exists() and out.is_dir():
        raise _Error(f"cannot write --out {path!r}: it is a directory")
    return out


def draw_grid(examples: list[dict], fine_names: list[str], coarse_names: list[str], out: Path,
              cols: int = 4, title: str = "") -> None:
    """Draws the examples (numpy dicts as from tfds.as_numpy) and writes `out` atomically."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    n = len(examples)
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig = plt.figure(figsize=(cols * CELL_W_IN, rows * CELL_H_IN), dpi=DPI)
    for k, ex in enumerate(examples):
        r, c = divmod(k, cols)
        # image in the top 3/4 of the cell, text below
        left = (c + 0.08) / cols
        width = 0.84 / cols
        bottom = 1.0 - (r + 0.66) / rows
        ax = fig.add_axes([left, bottom, width, 0.62 / rows])
        img = np.repeat(np.repeat(ex["image"], UPSCALE, axis=0), UPSCALE, axis=1)
        ax.imshow(img, interpolation="nearest")
        s = img.shape[0]
        objs = ex["objects"]
        for b, f in zip(objs["bbox"], objs["fine_label"]):
            y0, x0, y1, x1 = (np.asarray(b) * s).tolist()
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.2, ec="black"))
            ax.text(x0, y0 - 2, fine_names[int(f)], fontsize=6, color="black", va="bottom",
                    bbox=dict(fc="white", ec="none", alpha=0.7, pad=0.5))
        ax.set_xticks([])
        ax.set_yticks([])
        caption = ex["caption"].decode() if isinstance(ex["caption"], bytes) else str(ex["caption"])
        fl, cl = int(ex["fine_label"]), int(ex["coarse_label"])
        label = f"fine: {fine_names[fl]}   coarse: {coarse_names[cl]}" if fl >= 0 else "(text only)"
        text = "\n".join(textwrap.wrap(caption, 40)[:4]) + "\n" + label
        fig.text((c + 0.5) / cols, 1.0 - (r + 0.7) / rows, text, ha="center", va="top", fontsize=7.5,
                 wrap=False)
    if title:
        fig.suptitle(title, fontsize=8, y=0.999, va="top")
    from vlcore.atomic_files import atomic_output

    with atomic_output(out) as f:
        fig.savefig(f, dpi=DPI, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.n < 1:
            raise _Error(f"--n must be >= 1, got {args.n}")
        if args.cols < 1:
            raise _Error(f"--cols must be >= 1, got {args.cols}")
        out = _check_out(args.out)
        from vlcore.world import builder as B

        if args.split not in B.SPLITS:
            raise _Error(f"unknown split {args.split!r}; expected one of {list(B.SPLITS)}")
        try:
            cfg = B.config_for(args.config, args.seed)
        except ValueError as e:
            raise _Error(str(e)) from None
        b = B.VlWorld(config=cfg, data_dir=args.data_dir)
        if not b.is_prepared():
            if not args.prepare:
                raise _Error(f"no prepared vl_world/{b.builder_config.name} under {args.data_dir!r} "
                             "(pass --prepare to generate it)")
            b.download_and_prepare()
        if args.split not in b.info.splits:
            raise _Error(f"split {args.split!r} is empty in vl_world/{b.builder_config.name}")
        import tensorflow_datasets as tfds

        ds = b.as_dataset(split=args.split, shuffle_files=False).take(args.n)
        examples = list(tfds.as_numpy(ds))
        try:
            draw_grid(examples, b.info.features["fine_label"].names, b.info.features["coarse_label"].names,
                      out, cols=args.cols, title=f"vl_world/{b.builder_config.name} [{args.split}]")
        except OSError as e:
            raise _Error(f"cannot write --out {args.out!r}: {e}") from None
    except _Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(examples)} examples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
