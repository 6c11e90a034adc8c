"""Is the memory encoding job input-bound? Its images/s against the bare jitted encoder's, in one run.

    python -m benchmarks.encode_job --out encode_job.json
    python -m benchmarks.encode_job --two-tower out/two_tower --data-dir out/tfds --world-config quick

Every stage runs at one batch size (--batch) on the same split, in one process; the stages that
are repeated (--repeats, medians reported) run interleaved, so that a shared machine's drifting
load shows in all of them alike:

  bare encoder                  the jitted image tower on a batch already on the device, nothing else
  encode_images                 the frozen encoder's call on the split's decoded images (host batches:
                                adds the host->device copy, the padding of the last batch, the result copy)
  input pipeline (images)       `pair_batches` iterated alone: TFDS read, PNG decode, preprocess, tf.data
  input pipeline (+ captions)   the same with the captions (decoded to str on the host)
  encode job (images)           `encode_memory` without captions, into a fresh directory
  text encoder (once)           the split's captions through the text tower (MiniLM) alone
  encode job (+ captions, once) `encode_memory` with captions: the job as RECO runs it

vs_bare = a stage's examples/s / the bare encoder's; the job's (images only) is the number that
says whether the job is input-bound (>= 0.8: it is not). The caption job is compared with its two
towers alone: (bare encoder's time for the split + text encoder's time) / the job's time. cpu_s is
the process's CPU time over all threads: on a CPU host the input pipeline and the encoders share
the same cores.

The text tower caches the embeddings of sentences it has seen, so the two caption stages run once
each, on sentences it has not seen: after a warm-up (compiling every padded length) on the
captions with their words reversed, the text encoder stage gets the captions with their words
rotated by one (the same token counts), and the job the captions themselves.

Defaults: a random-init two-tower of the world's quick-preset architecture (throughput does not
depend on the weights) and a world of --examples memory examples generated into a temporary
directory; --two-tower and --data-dir take a trained model and a prepared world instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks.common import device_description, print_table, write_json

TARGET = 0.8  # the job's images/s over the bare encoder's at which it is not input-bound


@dataclasses.dataclass
class Row:
    stage: str
    examples: int  # counted as processed: embeddings returned, examples yielded, memory rows written
    seconds: float
    examples_per_s: float
    cpu_s: float  # process CPU time, all threads
    vs_bare: float

    @property
    def cores(self) -> float:  # the table's column: cores busy on average
        return self.cpu_s / self.seconds


TABLE = [("stage", "stage", "<32"), ("examples", "examples", ">8"), ("seconds", "seconds", ">8.3f"),
         ("examples/s", "examples_per_s", ">11.1f"), ("cores", "cores", ">5.2f"), ("vs_bare", "vs_bare", ">7.2f")]


def random_two_tower(workdir: Path, seed: int = 0) -> Path:
    """A two-tower work dir (model.json + one checkpoint) of the world's quick-preset architecture
    with random weights, as `vlcore.main` would leave it."""
    from vlcore.training.checkpointing import Checkpointer, prepare_workdir
    from vlcore.two_tower.model import TwoTower
    from vlcore.two_tower.task import default_config, vision_config

    model = default_config().model
    vision = vision_config(model)
    module = TwoTower(vision, embed_dim=model.embed_dim)
    params = module.init(jax.random.key(seed), jnp.zeros((1, vision.image_size, vision.image_size, 3), jnp.uint8))
    workdir = prepare_workdir(workdir, {"model": "two_tower", "vision": dataclasses.asdict(vision),
                                        "embed_dim": model.embed_dim, "text_tower": "bundled all-MiniLM-L6-v2"})
    checkpointer = Checkpointer(workdir / "checkpoints", save_every=1, keep=1, async_save=False)
    checkpointer.save(0, {"params": params["params"], "step": 0}, force=True)
    checkpointer.close()
    return workdir


def memory_world(data_dir: Path, examples: int):
    """The world's builder with only a memory split of `examples` examples (the quick world's first
    ones), generated under data_dir."""
    from vlcore.world import builder as world

    config = dataclasses.replace(world.QUICK, name=f"memory{examples}", memory=examples, web=0, fusion_train=0,
                                 test=0, text_corpus=0)
    return world.prepare(data_dir, config)


def bare_encoder(encoder) -> tuple[Callable[[jax.Array], jax.Array], NamedSharding]:
    """(images on the devices -> embeddings, the images' sharding): the two-tower's jitted image
    tower alone, its rows split over the local devices as the frozen encoder splits them."""
    from vlcore.encoders.configs import CLIPVisionConfig
    from vlcore.two_tower.model import TwoTower

    module = TwoTower(CLIPVisionConfig(**encoder.model_record["vision"]), embed_dim=encoder.dim)
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
    rows = NamedSharding(mesh, P("data"))
    params = jax.device_put(encoder.params, NamedSharding(mesh, P()))
    fn = jax.jit(lambda p, x: module.apply({"params": p}, x, method=TwoTower.embed_images), out_shardings=rows)
    return lambda images: fn(params, images), rows


def timed(fn: Callable[[], int]) -> tuple[int, float, float]:
    """(what fn returns: the examples it processed, wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    count = fn()
    return count, time.perf_counter() - wall, time.process_time() - cpu


def reversed_words(captions: list[str]) -> list[str]:
    return [" ".join(c.split()[::-1]) for c in captions]


def rotated_words(captions: list[str]) -> list[str]:
    return [" ".join(c.split()[1:] + c.split()[:1]) for c in captions]


def run(encoder, builder, split: str, batch: int, repeats: int, log: Callable[[str], None]) -> list[Row]:
    from retrieval.encode_memory import encode_memory
    from vlcore.tfds_pairs import pair_batches, split_size

    n = split_size(builder, split)
    batch = -(-batch // jax.local_device_count()) * jax.local_device_count()
    shard_size = 16 * batch  # the job's 4096 at batch 256; shards must be whole batches

    def read(caption_key: str | None) -> int:
        return sum(len(b["index"]) for b in pair_batches(builder, split, caption_key=caption_key,
                                                         preprocess=encoder.preprocess, batch_size=batch))

    def job(caption_key: str | None) -> int:
        out = tempfile.mkdtemp(prefix="encode_job-")
        try:
            return encode_memory(encoder, builder, split, out, caption_key=caption_key, batch_size=batch,
                                 shard_size=shard_size, progress=False).count
        finally:
            shutil.rmtree(out)

    log(f"warm-up: decoding {n} examples, compiling the encoders")
    decoded = list(pair_batches(builder, split, preprocess=encoder.preprocess, batch_size=batch))
    images = np.concatenate([b["image"] for b in decoded])
    captions = [c for b in decoded for c in b["caption"]]
    bare, sharding = bare_encoder(encoder)
    first = images[:batch]  # padded as the encoder pads a short batch, if the split is one
    first = np.pad(first, [(0, batch - len(first))] + [(0, 0)] * (first.ndim - 1), mode="edge")
    on_device = jax.block_until_ready(jax.device_put(first, sharding))
    calls = -(-n // batch)  # as many batches as the job encodes

    def bare_run() -> int:
        jax.block_until_ready([bare(on_device) for _ in range(calls)])
        return calls * batch

    def encode_images() -> int:
        return sum(len(encoder.encode_images(images[i:i + batch])) for i in range(0, n, batch))

    bare_run()
    encode_images()
    job(None)
    encoder.encode_texts(reversed_words(captions))

    repeated = {"bare encoder": bare_run, "encode_images": encode_images,
                "input pipeline (images)": lambda: read(None), "input pipeline (+ captions)": lambda: read("caption"),
                "encode job (images)": lambda: job(None)}
    samples: dict[str, list[tuple[int, float, float]]] = {stage: [] for stage in repeated}
    for r in range(repeats):
        log(f"round {r + 1}/{repeats}")
        for stage, fn in repeated.items():
            samples[stage].append(timed(fn))
    log("the caption stages (once each, on sentences the text tower has not seen)")
    samples["text encoder (once)"] = [timed(lambda: len(encoder.encode_texts(rotated_words(captions))))]
    samples["encode job (+ captions, once)"] = [timed(lambda: job("caption"))]

    rows = []
    for stage, runs in samples.items():
        counts = {count for count, _, _ in runs}
        assert len(counts) == 1, (stage, counts)  # every repeat processed the same examples
        seconds = statistics.median(s for _, s, _ in runs)
        cpu = statistics.median(c for _, _, c in runs)
        rows.append(Row(stage, counts.pop(), seconds, 0.0, cpu, 0.0))
    for row in rows:
        row.examples_per_s = row.examples / row.seconds
        row.vs_bare = row.examples_per_s / rows[0].examples_per_s
    return rows


def parse_args(argv) -> argparse.Namespace:
    from vlcore.world.builder import VlWorld

    p = argparse.ArgumentParser(prog="python -m benchmarks.encode_job", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--two-tower", type=Path, help="work dir of a trained two-tower (default: random weights, "
                                                  "the world's quick architecture)")
    p.add_argument("--data-dir", type=Path, help="a TFDS dir holding a prepared vl_world (default: generate "
                                                 "--examples memory examples into a temporary dir)")
    p.add_argument("--world-config", default="quick", choices=[c.name for c in VlWorld.BUILDER_CONFIGS],
                   help="vl_world config in --data-dir (default: quick)")
    p.add_argument("--split", default="memory", help="split of --data-dir's world (default: memory)")
    p.add_argument("--examples", type=int, default=5000,
                   help="memory examples of the generated world (default: 5000, the quick world's memory)")
    p.add_argument("--batch", type=int, default=256, help="batch size of every stage (default: 256)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds of the repeated stages; medians")
    p.add_argument("--out", type=Path, help="write {'device', ..., 'rows': [...]} here as JSON")
    args = p.parse_args(argv)
    if args.examples < 1:
        p.error(f"--examples must be at least 1, got {args.examples}")
    if args.batch < 1:
        p.error(f"--batch must be at least 1, got {args.batch}")
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    for flag, path in (("--two-tower", args.two_tower), ("--data-dir", args.data_dir)):
        if path is not None and not path.is_dir():
            p.error(f"{flag}: no directory {path}")
    if args.out is not None and not args.out.parent.is_dir():
        p.error(f"--out: directory {args.out.parent} does not exist")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from vlcore.frozen_encoders import EncoderError, TwoTowerEncoder
    from vlcore.tfds_pairs import PairDataError
    from vlcore.world import builder as world

    def log(message: str) -> None:
        print(f"... {message}", file=sys.stderr, flush=True)

    load_start = os.getloadavg()[0]  # other work on the machine skews every stage
    with tempfile.TemporaryDirectory() as tmp:
        try:
            encoder = TwoTowerEncoder(args.two_tower or random_two_tower(Path(tmp) / "two_tower"),
                                      batch_size=args.batch)
            if args.data_dir is None:
                log(f"generating a world of {args.examples} memory examples")
                with contextlib.redirect_stdout(sys.stderr):  # TFDS prints its progress: stdout is the table
                    builder, split = memory_world(Path(tmp) / "tfds", args.examples), "memory"
            else:
                builder, split = world.builder(args.data_dir, args.world_config), args.split
                if not builder.is_prepared():
                    raise PairDataError(f"--data-dir {args.data_dir}: no prepared vl_world/{args.world_config}")
            rows = run(encoder, builder, split, args.batch, args.repeats, log)
        except (EncoderError, PairDataError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    load_end = os.getloadavg()[0]
    stage = {r.stage: r for r in rows}
    bare, job = stage["bare encoder"], stage["encode job (images)"]
    # The caption job against its two towers alone: the image tower's time for the split's
    # examples plus the text tower's.
    towers_s = bare.seconds * job.examples / bare.examples + stage["text encoder (once)"].seconds
    caption_job_vs_towers = towers_s / stage["encode job (+ captions, once)"].seconds
    device = device_description()
    print(f"device: {device}; vl_world/{builder.builder_config.name} split {split}, {rows[0].examples} images "
          f"per bare-encoder round, batch {args.batch}; load average (1 min) at start / end: "
          f"{load_start:.1f} / {load_end:.1f} on {os.cpu_count()} cores")
    print_table(rows, TABLE)
    print(f"encode job / bare encoder: {job.vs_bare:.2f} "
          f"({'not input-bound' if job.vs_bare >= TARGET else 'input-bound'}: target >= {TARGET})")
    print(f"encode job (+ captions) / (bare encoder + text encoder): {caption_job_vs_towers:.2f}")
    if args.out is not None:
        write_json(args.out, {"device": device, "cores": os.cpu_count(), "batch": args.batch,
                              "dataset": f"vl_world/{builder.builder_config.name}", "split": split,
                              "encoder": encoder.fingerprint(), "load_average": [load_start, load_end],
                              "rows": [dataclasses.asdict(r) for r in rows],
                              "encode_job_vs_bare": job.vs_bare, "caption_job_vs_towers": caption_job_vs_towers})
    return 0


if __name__ == "__main__":
    sys.exit(main())
