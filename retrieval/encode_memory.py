"""Encodes a TFDS dataset of image-text pairs into a memory store with a frozen two-tower model.

    python -m retrieval.encode_memory --encoder=two_tower:out/two_tower \
        --dataset=vl_world/quick --split=memory --data_dir=out/tfds --out=out/memory
    python -m retrieval.encode_memory --encoder=hf_clip:/models/clip-vit-b32 \
        --dataset=coco_captions --split=train --caption_key=captions/text --out=/data/coco_memory

Every example becomes one memory row with id = its position in the split, an image embedding
and a text embedding (the first caption); `--payload_keys` adds fixed-shape features (labels).
Images are encoded in jitted batches split over all local devices, with a progress bar.

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
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from retrieval.memory_store import MANIFEST_NAME, Manifest, MemoryStore, MemoryStoreError, MemoryWriter
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


def _check_source(out_dir: Path, source: dict) -> None:
    path = out_dir / SOURCE_NAME
    if path.exists():
        diff = differing_keys(json.loads(path.read_text()), source)
        if diff:
            raise MemoryStoreError(f"{out_dir} holds a memory of another source (differs in: {', '.join(diff)}); "
                                   "use a new --out directory")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, source)


def encode_memory(encoder: FrozenEncoder, builder: Any, split: str, out_dir: str | os.PathLike, *,
                  image_key: str = "image", caption_key: str | None = "caption", payload_keys: Sequence[str] = (),
                  batch_size: int = 256, shard_size: int = 4096, dtype: str = "float32",
                  progress: bool = True, after_batch: Callable[[int], None] | None = None) -> Manifest:
    """Encodes every example of `builder`'s `split` into the memory at `out_dir` (resumable).

    caption_key=None (a dataset without captions, e.g. a classification test set) stores image
    embeddings only. `after_batch(examples_done)` is called after each batch (used by tests to interrupt a run).
    """
    out_dir = Path(out_dir)
    if batch_size < 1 or shard_size < 1 or shard_size % batch_size:
        raise MemoryStoreError(f"shard_size ({shard_size}) must be a positive multiple of batch_size "
                               f"({batch_size}): batches aligned to shards make a resumed memory identical")
    n = split_size(builder, split)
    if n == 0:
        raise MemoryStoreError(f"{builder.name} split {split!r} is empty: nothing to put in a memory")
    check_keys(builder, [image_key, *([caption_key] if caption_key else [])])
    payload = _payload_spec(builder, payload_keys)
    source = {"dataset": builder.name, "config": builder.builder_config.name if builder.builder_config else None,
              "version": str(builder.version), "split": split, "image_key": image_key,
              "caption_key": caption_key, "payload_keys": list(payload_keys), "count": n}
    if (out_dir / MANIFEST_NAME).exists():
        _check_source(out_dir, source)
        return MemoryStore.open(out_dir).manifest
    _check_source(out_dir, source)
    modalities = ("image", "text") if caption_key else ("image",)
    with MemoryWriter(out_dir, encoder_fingerprint=encoder.fingerprint(), dim=encoder.dim, dtype=dtype,
                      modalities=modalities, shard_size=shard_size, payload_spec=payload) as writer:
        start = writer.num_written
        batches = pair_batches(builder, split, image_key=image_key, caption_key=caption_key,
                               extra_keys=payload_keys, preprocess=encoder.preprocess, batch_size=batch_size,
                               start=start)
        with tqdm(total=n, initial=start, desc=f"encoding {builder.name}/{split}", unit="ex",
                  disable=not progress) as bar:
            # Images are encoded batch by batch; captions a shard at a time, which lets the text
            # encoder fill its batches with distinct sentences (captions repeat a lot).
            pending: list[tuple[dict, np.ndarray]] = []
            for batch in batches:
                pending.append((batch, encoder.encode_images(batch["image"])))
                done = int(batch["index"][-1]) + 1
                if done == n or sum(len(b["index"]) for b, _ in pending) >= shard_size:
                    _write_pending(writer, encoder, pending, caption_key, payload)
                    pending = []
                bar.update(len(batch["index"]))
                if after_batch is not None:
                    after_batch(done)
        return writer.close()


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
