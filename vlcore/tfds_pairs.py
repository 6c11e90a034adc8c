"""Batches of (index, image, caption, extra fields) from any TFDS image dataset, in file order.

The same reader serves the world and real TFDS datasets: `image_key` names the image feature
and `caption_key` the text, as a path into nested features ("caption" for the world,
"captions/text" for coco_captions, where the first caption of each image is used). Images go
through the frozen encoder's `preprocess` inside tf.data, so datasets with images of varying
size batch. Example indices are positions in the split; reading can start at any index
(`start`), through TFDS's split slicing, which skips the records without decoding them. Only the
features asked for are parsed and decoded (the world's examples also hold objects, tags and
relations: parsing them was a quarter of the input's CPU time).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vlcore.errors import InputError


class PairDataError(InputError):
    """A dataset, split or feature that cannot be read as image-caption pairs."""


def _feature(features: Any, path: str) -> Any:
    node = features
    for part in path.split("/"):
        try:
            node = node[part]
        except (KeyError, TypeError):
            raise PairDataError(f"no feature {path!r}; the dataset has {sorted(features.keys())}") from None
    return node


def _get(example: dict, path: str) -> tf.Tensor:
    node = example
    for part in path.split("/"):
        node = node[part]
    return node


def check_keys(builder: tfds.core.DatasetBuilder, keys: Sequence[str]) -> None:
    """Raises PairDataError naming the first of `keys` (feature paths) the dataset lacks."""
    for key in keys:
        _feature(builder.info.features, key)


def split_sizes_known(builder: tfds.core.DatasetBuilder) -> bool:
    """False for a builder without split metadata: one that is not prepared, or one whose examples
    are made on the fly from its features (TFDS's mock data), which accepts any split name."""
    return bool(builder.info.splits)


def partial_decoding(keys: Sequence[str]) -> tfds.decode.PartialDecoding:
    """TFDS decoders that parse and decode only the features at `keys` (paths like "captions/text")."""
    spec: dict = {}
    for key in keys:
        *parents, leaf = key.split("/")
        node = spec
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = True
    return tfds.decode.PartialDecoding(spec)


def open_split(builder: tfds.core.DatasetBuilder, split: str, keys: Sequence[str] | None = None,
               options: tf.data.Options | None = None) -> tf.data.Dataset:
    """builder.as_dataset(split) in file order, read once, only the features at `keys` (None: all of
    them), with tf.data `options`; a dataset that is not prepared is a PairDataError."""
    # A builder without split metadata (TFDS's mock data) makes its examples on the fly from the
    # features it is asked for: decoding fewer features would make other examples.
    decoders = None if keys is None or not split_sizes_known(builder) else partial_decoding(keys)
    # No auto-cache (TFDS copies every decoded example of a small dataset into memory, for a
    # second pass that never comes) and no prefetch of single examples (callers prefetch batches).
    read_config = tfds.ReadConfig(try_autocache=False, skip_prefetch=True, options=options)
    try:
        return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders, read_config=read_config)
    except AssertionError as e:  # TFDS's "could not find data in DIR"
        raise PairDataError(f"dataset {builder.name} is not prepared in {builder.data_dir_root}; prepare it with "
                            f"`tfds build {builder.name} --data_dir=...` first ({str(e).split('.')[0]})") from None


def split_size(builder: tfds.core.DatasetBuilder, split: str) -> int:
    if not split_sizes_known(builder):
        return int(open_split(builder, split).cardinality())
    if split not in builder.info.splits:
        raise PairDataError(f"{builder.name}: no split {split!r}; available: {sorted(builder.info.splits.keys())}")
    return builder.info.splits[split].num_examples


def pair_batches(builder: tfds.core.DatasetBuilder, split: str, *, image_key: str = "image",
                 caption_key: str | None = "caption", extra_keys: Sequence[str] = (),
                 preprocess: Callable[[tf.Tensor], tf.Tensor] | None = None, batch_size: int = 256,
                 start: int = 0, stop: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yields {"index": int64 [b], "image": [b, ...], "caption": str [b], **extra} of the examples
    [start, stop) (stop None: to the end)."""
    n = split_size(builder, split)
    keys = [image_key, *([caption_key] if caption_key else []), *extra_keys]
    check_keys(builder, keys)
    if not 0 <= start <= n:
        raise PairDataError(f"start {start} outside the split's {n} examples")
    stop = n if stop is None else stop
    if not start <= stop <= n:
        raise PairDataError(f"stop {stop} outside [{start}, {n}]")
    if start == stop:
        return
    # Parallel calls fixed (at the thread pool's size, the core count) instead of autotuned: the
    # tuner's thread takes CPU from the encoder the batches feed, and deleting the iterator waits
    # for its optimisation pass to end (up to half a second on 2 cores, a fifth of the time to
    # encode 5,000 world images).
    options = tf.data.Options()
    options.autotune.enabled = False
    if split_sizes_known(builder):
        ds = open_split(builder, f"{split}[{start}:{stop}]", keys, options)
    else:  # no slicing without split metadata
        ds = open_split(builder, split, keys, options).skip(start).take(stop - start)

    def select(example):
        out = {"image": _get(example, image_key)}
        if preprocess is not None:
            out["image"] = preprocess(out["image"])
        if caption_key:
            text = _get(example, caption_key)
            out["caption"] = text[0] if text.shape.rank == 1 else text  # first caption of a list
        for key in extra_keys:
            out[key.replace("/", "_")] = _get(example, key)
        return out

    ds = ds.map(select, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    position = start
    for batch in tfds.as_numpy(ds.batch(batch_size).prefetch(2)):
        b = len(batch["image"])
        batch["index"] = np.arange(position, position + b, dtype=np.int64)
        if "caption" in batch:
            batch["caption"] = np.array([s.decode("utf-8") for s in batch["caption"]], dtype=object)
        position += b
        yield batch
