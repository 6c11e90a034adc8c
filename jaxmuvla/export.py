"""A pre-trained µ-VLA work dir -> a transformers `VisualBertForPreTraining` directory.

    python -m jaxmuvla.export --config=configs/muvla_world.py --workdir=out/muvla_runs/muvla --out=out/muvla_hf

The config is the one that trained the work dir (the same flags): it rebuilds the model's
description (and the corpus vocabulary, when the config restricts it) and must match the work
dir's `model.json`. The latest checkpoint's `visual_bert` and `cls` parameters are written in
HF's layout (config.json + model.safetensors) with the tokenizer files: the init checkpoint's, or,
for a restricted vocabulary, its `vocab.txt` of the kept word pieces (in the model's order) and
the source's tokenizer settings. µ-VLA's own parts are not in transformers' VisualBERT: the
region heads are left out, and the box embedding, which changes every region token, is written
to `muvla_extras.safetensors` beside it (a transformers model without it sees the regions
without their boxes; the command says so when the model has one).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags
from flax.traverse_util import flatten_dict
from ml_collections import config_flags

from vlcore.errors import InputError

log = logging.getLogger(__name__)

_FLAGS: dict[str, Any] = {}  # defined only when run as a command: importing this module defines no absl flags


def define_flags() -> None:
    _FLAGS["config"] = config_flags.DEFINE_config_file("config", None, "the config that trained the work dir",
                                                       lock_config=False)
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "a µ-VLA pre-training work dir")
    _FLAGS["out"] = flags.DEFINE_string("out", None, "directory to write (created; must not hold a checkpoint already)")
    flags.mark_flags_as_required(["config", "workdir", "out"])

EXTRAS_NAME = "muvla_extras.safetensors"
# tokenizer.json holds the whole vocabulary: with a restricted one only vocab.txt is rewritten
TOKENIZER_SETTINGS = ("tokenizer_config.json", "special_tokens_map.json")


class ExportError(InputError):
    """A work dir that cannot be exported as asked."""


def latest_params(workdir: Path) -> tuple[int, Any]:
    """(step, params as numpy) of the work dir's latest finished checkpoint."""
    import orbax.checkpoint as ocp
    import jax

    checkpoints = workdir / "checkpoints"
    manager = ocp.CheckpointManager(checkpoints.absolute()) if checkpoints.is_dir() else None
    step = manager.latest_step() if manager is not None else None
    if step is None:
        raise ExportError(f"{workdir}: no finished checkpoint; pre-train first")
    restored = manager.restore(step, args=ocp.args.StandardRestore())
    manager.close()
    return step, jax.tree.map(np.asarray, restored["params"])


def visual_bert_export(module, params: dict[str, Any]):
    """The `hf_checkpoint.Pretrained` of a MuVLA's VisualBertForPreTraining part."""
    from vlcore.encoders.visual_bert import VisualBertForPreTraining
    from vlcore.hf_checkpoint import from_flax

    return from_flax(VisualBertForPreTraining(module.config), {"visual_bert": params["visual_bert"],
                                                                "cls": params["cls"]})


def write_tokenizer(out: Path, source: Path, vocabulary) -> None:
    """The init checkpoint's tokenizer files, or the restricted vocabulary's vocab.txt with its settings."""
    from vlcore.hf_checkpoint import TOKENIZER_FILES

    if vocabulary is None:
        names = [n for n in TOKENIZER_FILES if (source / n).is_file()]
    else:
        names = [n for n in TOKENIZER_SETTINGS if (source / n).is_file()]
        (out / "vocab.txt").write_text("".join(t + "\n" for t in vocabulary.tokens))
    for name in names:
        shutil.copyfile(source / name, out / name)


def export(task, workdir: Path, out: Path) -> dict[str, Any]:
    """Writes the HF directory `out` (atomically: a temporary directory renamed); returns a summary."""
    from safetensors.numpy import save_file

    from vlcore.atomic_files import differing_keys
    from vlcore.hf_checkpoint import save_pretrained
    from vlcore.sentence_encoder import bundled_minilm_path

    record = workdir / "model.json"
    if not record.is_file():
        raise ExportError(f"{workdir}: no model.json; expected a µ-VLA pre-training work dir")
    diff = differing_keys(json.loads(record.read_text()), json.loads(json.dumps(task.fingerprint(), sort_keys=True)))
    if diff:
        raise ExportError(f"{workdir}: trained with another config (differs in: {', '.join(diff)}); "
                          "pass the flags that trained it")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out}: exists and is not empty")
    step, params = latest_params(workdir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        save_pretrained(visual_bert_export(task.module, params), tmp)
        write_tokenizer(tmp, Path(task.config.model.init or bundled_minilm_path()), task.vocabulary)
        extras = {}
        if "box_embedding" in params:
            extras = {"box_embedding." + ".".join(k): np.ascontiguousarray(v)
                      for k, v in flatten_dict(params["box_embedding"]).items()}
            save_file(extras, str(tmp / EXTRAS_NAME), metadata={"format": "flax"})
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"step": step, "out": str(out), "box_embedding": bool(extras), "pooling": task.module.pooling,
            "vocab_size": task.module.config.vocab_size}


def main(argv: list[str]) -> int:
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    from jaxmuvla import pretrain
    from vlcore.training.config_check import validate_config

    try:
        config = _FLAGS["config"].value
        validate_config(config, pretrain)
        summary = export(pretrain.PretrainTask(config, build_corpus=False), Path(_FLAGS["workdir"].value), Path(_FLAGS["out"].value))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {summary['out']}: VisualBertForPreTraining of step {summary['step']}, "
          f"{summary['vocab_size']} word pieces")
    if summary["box_embedding"]:
        print(f"note: the model adds µ-VLA's box embedding to its region tokens; transformers' VisualBERT has "
              f"none (it is in {EXTRAS_NAME}): a transformers model sees the regions without their boxes")
    if summary["pooling"] != "cls":
        print(f"note: the model's image-text head read the {summary['pooling']} of the tokens; transformers' "
              "VisualBERT pools [CLS] (its seq_relationship logits differ)")
    return 0


if __name__ == "__main__":
    from vlcore.training.config_check import parse_flags

    define_flags()
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
