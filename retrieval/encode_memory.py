"""Encodes a TFDS dataset of image-text pairs into a memory store with a frozen two-tower model.

    python -m retrieval.encode_memory --encoder=two_tower:out/two_tower \
        --dataset=vl_world/quick --split=memory --data_dir=out/tfds --out=out/memory
    python -m retrieval.encode_memory --encoder=hf_clip:/models/clip-vit-b32 \
        --dataset=coco_captions --split=train --caption_key=captions/text --out=/data/coco_memory

Every example becomes one memory row with id = its position in the split, an image embedding
and a text embedding (the first caption); `--payload_keys` adds fixed-shape features (labels).
Images are encoded in jitted batches split over all local devices, with a progress bar, while
the next batch is read and decoded (`python -m benchmarks.encode_job` measures the job against
the bare encoder).

Interrupted (Ctrl-C, SIGKILL, a preempted job) and rerun with the same command, it continues
after the last complete shard: reading restarts at that example (TFDS split slicing) and,
batches being aligned to shards, the finished memory is identical, checksums included, to an
uninterrupted run. `source.json` records which dataset the memory holds; a rerun that names a
different dataset or encoder is refused before anything is touched.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from retrieval.memory_store import MANIFEST_NAME, Manifest, MemoryStore, MemoryStoreError, MemoryWriter
from vlcore import fs
from vlcore.array_shards import shard_name
from vlcore.atomic_files import atomic_write_json, differing_keys
from vlcore.frozen_encoders import EncoderError, FrozenEncoder
from vlcore.tfds_pairs import PairDataError, check_keys, pair_batches, split_size

SOURCE_NAME = "source.json"


def _payload_spec(builder: Any, keys: Sequence[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    spec = {}
    for key in keys:
        feature = builder.info.features
        for part in key.split("/"):
            try:
                feature = feature[part]
            except (KeyError, TypeError):
                raise PairDataError(f"payload key {key!r}: no such feature in {builder.name}") from None
        shape, dtype = tuple(feature.shape), np.dtype(feature.np_dtype).name
        if None in shape or dtype in ("object", "str"):
            raise PairDataError(f"payload key {key!r}: only fixed-shape numeric features can be payload "
                                f"(got shape {shape}, dtype {dtype})")
        spec[key.replace("/", "_")] = (shape, dtype)
    return spec


def _check_source(out_dir: str, source: dict) -> None:
    path = fs.join(out_dir, SOURCE_NAME)
    if fs.exists(path):
        diff = differing_keys(json.loads(fs.read_text(path)), source)
        if diff:
            raise MemoryStoreError(f"{out_dir} holds a memory of another source (differs in: {', '.join(diff)}); "
                                   "use a new --out directory")
    else:
        fs.makedirs(out_dir)
        atomic_write_json(path, source)


def encode_memory(encoder: FrozenEncoder, builder: Any, split: str, out_dir: str | os.PathLike, *,
                  image_key: str = "image", caption_key: str | None = "caption", payload_keys: Sequence[str] = (),
                  batch_size: int = 256, shard_size: int = 4096, dtype: str = "float32",
                  progress: bool = True, after_batch: Callable[[int], None] | None = None,
                  process_index: int = 0, process_count: int = 1,
                  barrier: Callable[[str], None] | None = None) -> Manifest:
    """Encodes every example of `builder`'s `split` into the memory at `out_dir` (resumable).

    caption_key=None (a dataset without captions, e.g. a classification test set) stores image
    embeddings only. `after_batch(examples_done)` is called after each batch (used by tests to interrupt a run).

    Several processes (the hosts of a job) share the work when every one calls this with its
    `process_index`, the `process_count` and a `barrier(name)` that blocks until all reach it
    (e.g. `multihost_utils.sync_global_devices`): process p encodes the full shards i with
    i % process_count == p (each into its own one-shard store under `.parts/`), then process 0
    moves them into place, encodes the last, partial shard and writes the manifest. The store is
    the one-process store, checksums included, when every process encodes on the same number of
    devices (XLA's results may differ in the last bits between device counts).
    """
    out_dir = fs.fspath(out_dir)
    if batch_size < 1 or shard_size < 1 or shard_size % batch_size:
        raise MemoryStoreError(f"shard_size ({shard_size}) must be a positive multiple of batch_size "
                               f"({batch_size}): batches aligned to shards make a resumed memory identical")
    if not 0 <= process_index < process_count:
        raise MemoryStoreError(f"process_index={process_index}: need 0 <= index < process_count={process_count}")
    if process_count > 1 and barrier is None:
        raise MemoryStoreError("process_count > 1 needs a barrier (process 0 must see the others' shards)")
    n = split_size(builder, split)
    if n == 0:
        raise MemoryStoreError(f"{builder.name} split {split!r} is empty: nothing to put in a memory")
    check_keys(builder, [image_key, *([caption_key] if caption_key else [])])
    payload = _payload_spec(builder, payload_keys)
    source = {"dataset": builder.name, "config": builder.builder_config.name if builder.builder_config else None,
              "version": str(builder.version), "split": split, "image_key": image_key,
              "caption_key": caption_key, "payload_keys": list(payload_keys), "count": n}
    if fs.exists(fs.join(out_dir, MANIFEST_NAME)):
        _check_source(out_dir, source)
        return MemoryStore.open(out_dir).manifest
    settings = dict(encoder_fingerprint=encoder.fingerprint(), dim=encoder.dim, dtype=dtype,
                    modalities=("image", "text") if caption_key else ("image",), shard_size=shard_size,
                    payload_spec=payload)
    rows = _RowEncoder(encoder, builder, split, n, dict(image_key=image_key, caption_key=caption_key,
                                                        extra_keys=payload_keys, preprocess=encoder.preprocess,
                                                        batch_size=batch_size),
                       payload, progress, after_batch)
    if process_count > 1:
        _encode_share(out_dir, rows, source, settings, process_index, process_count, barrier)
        if process_index != 0:
            barrier("encode_memory:manifest")
            return MemoryStore.open(out_dir).manifest
    else:
        _check_source(out_dir, source)
    with MemoryWriter(out_dir, **settings) as writer:
        rows.encode(writer, writer.num_written, n)
        manifest = writer.close()
    if process_count > 1:
        barrier("encode_memory:manifest")
    return manifest


PARTS_NAME = ".parts"  # the shares of other processes, one one-shard store each, until process 0 moves them


def _encode_share(out_dir: str, rows: "_RowEncoder", source: dict, settings: dict, process_index: int,
                  process_count: int, barrier: Callable[[str], None]) -> None:
    """This process's full shards, each encoded into `.parts/shard-i/`; then (process 0) moved into place."""
    if process_index == 0:
        _check_source(out_dir, source)
        MemoryWriter(out_dir, **settings)  # writes the writer settings, or checks an earlier run's
    barrier("encode_memory:prepared")
    if process_index != 0:
        _check_source(out_dir, source)  # read-only now: process 0 wrote it
    per = settings["shard_size"]
    parts = fs.join(out_dir, PARTS_NAME)
    for i in range(process_index, rows.n // per, process_count):
        part = fs.join(parts, shard_name(i))
        if fs.isdir(fs.join(out_dir, shard_name(i))) or fs.exists(fs.join(part, MANIFEST_NAME)):
            continue  # moved into place, or encoded, by an earlier run
        with MemoryWriter(part, **settings) as writer:
            rows.encode(writer, i * per + writer.num_written, (i + 1) * per)
            writer.close()
    barrier("encode_memory:shares")
    if process_index == 0:
        for i in range(rows.n // per):
            final = fs.join(out_dir, shard_name(i))
            if not fs.isdir(final):
                _move_shard(fs.join(parts, shard_name(i), shard_name(0)), final)
        if fs.exists(parts):
            fs.rmtree(parts)


def _move_shard(src: str, dst: str) -> None:
    """A local rename is atomic; on an object store a directory is copied object by object (a copy
    cut short is a shard with missing files, which the writer's resume drops and encodes again)."""
    if fs.is_local(src):
        os.rename(src, dst)
    else:
        fs.copy_tree(src, dst)
        fs.rmtree(src)


class _RowEncoder:
    """Encodes examples [start, stop) of a split into a MemoryWriter, shard by shard."""

    def __init__(self, encoder: FrozenEncoder, builder: Any, split: str, n: int, read: dict, payload: dict,
                 progress: bool, after_batch: Callable[[int], None] | None):
        self.encoder, self.builder, self.split, self.n, self.read = encoder, builder, split, n, read
        self.payload, self.progress, self.after_batch = payload, progress, after_batch

    def encode(self, writer: MemoryWriter, start: int, stop: int) -> None:
        encoder, caption_key = self.encoder, self.read["caption_key"]
        batches = pair_batches(self.builder, self.split, start=start, stop=stop, **self.read)
        with tqdm(total=stop, initial=start, desc=f"encoding {self.builder.name}/{self.split}", unit="ex",
                  disable=not self.progress) as bar, ThreadPoolExecutor(max_workers=1) as image_worker:
            # Images are encoded batch by batch; captions a shard at a time, which lets the text
            # encoder fill its batches with distinct sentences (captions repeat a lot).
            pending: list[tuple[dict, np.ndarray]] = []
            for batch, images in _encoded_ahead(encoder, batches, image_worker):
                pending.append((batch, images))
                done = int(batch["index"][-1]) + 1
                if done == stop or sum(len(b["index"]) for b, _ in pending) >= writer.shard_size:
                    _write_pending(writer, encoder, pending, caption_key, self.payload)
                    pending = []
                bar.update(len(batch["index"]))
                if self.after_batch is not None:
                    self.after_batch(done)


def _encoded_ahead(encoder: FrozenEncoder, batches: Iterable[dict],
                   worker: ThreadPoolExecutor) -> Iterator[tuple[dict, np.ndarray]]:
    """(batch, its image embeddings [b, dim]) in order, batch i+1 read while `worker` encodes batch i.

    Encoding in line would leave the encoder idle while this thread waits for tf.data, converts
    the captions and writes shards; the worker's wait for the encoder releases the GIL.
    """
    in_flight = None
    for batch in batches:
        started = batch, worker.submit(encoder.encode_images, batch["image"])
        if in_flight is not None:
            yield in_flight[0], in_flight[1].result()
        in_flight = started
    if in_flight is not None:
        yield in_flight[0], in_flight[1].result()


def _write_pending(writer: MemoryWriter, encoder: FrozenEncoder, pending: list[tuple[dict, np.ndarray]],
                   caption_key: str | None, payload: dict) -> None:
    """Adds the encoded batches of one shard (their captions encoded together) to the writer."""
    embeddings = {"image": np.concatenate([e for _, e in pending])}
    if caption_key:
        embeddings["text"] = encoder.encode_texts([c for b, _ in pending for c in b["caption"]])
    writer.add(np.concatenate([b["index"] for b, _ in pending]), embeddings,
               {name: np.concatenate([b[name] for b, _ in pending]) for name in payload} or None)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m retrieval.encode_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", required=True, help="two_tower:WORKDIR or hf_clip:DIR")
    parser.add_argument("--dataset", default="vl_world/quick", help="TFDS name[/config] (default vl_world/quick)")
    parser.add_argument("--split", default="memory")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's)")
    parser.add_argument("--out", required=True, help="memory directory to write (or resume)")
    parser.add_argument("--image_key", default="image")
    parser.add_argument("--caption_key", default="caption", help="text feature; 'captions/text' for coco_captions; '' = images only")
    parser.add_argument("--payload_keys", default="", help="comma-separated fixed-shape features to keep")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--shard_size", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    args = parser.parse_args(argv)

    import tensorflow_datasets as tfds
    from vlcore.frozen_encoders import load_frozen_encoder

    if args.dataset.split("/")[0] == "vl_world":
        import vlcore.world.builder  # noqa: F401  (registers the world's TFDS builder)
    try:
        encoder = load_frozen_encoder(args.encoder)
        try:
            builder = tfds.builder(args.dataset, data_dir=args.data_dir)
        except Exception as e:  # TFDS raises several types for unknown names/configs
            raise PairDataError(f"--dataset {args.dataset!r}: {e}") from None
        if not builder.is_prepared():
            raise PairDataError(f"--dataset {args.dataset!r} is not prepared in "
                                f"{args.data_dir or 'the default TFDS data dir'}")
        keys = [k for k in args.payload_keys.split(",") if k]
        manifest = encode_memory(encoder, builder, args.split, args.out, image_key=args.image_key,
                                 caption_key=args.caption_key or None, payload_keys=keys, batch_size=args.batch_size,
                                 shard_size=args.shard_size, dtype=args.dtype)
    except (EncoderError, PairDataError, MemoryStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"memory": str(args.out), "count": manifest.count, "dim": manifest.dim,
                      "shards": len(manifest.shards), "encoder": manifest.encoder_fingerprint}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
