"""Builds µ-VLA's weakly aligned corpus: every image's regions, K sentences retrieved by its tags,
their noun phrases and the phrase each region matches (format: `jaxmuvla.corpus`).

    # the embedded world: its web split's images (captions thrown away), its unaligned text corpus
    python -m jaxmuvla.build_corpus --images=world:quick:web --encoder=two_tower:out/two_tower \\
        --corpus=tfds:vl_world/quick:text_corpus --data_dir=out/tfds --out=out/muvla_corpus
    # the upper bound (aligned VLP): each web image's own caption instead of retrieved sentences
    python -m jaxmuvla.build_corpus --images=world:quick:web --encoder=two_tower:out/two_tower \\
        --corpus=tfds:vl_world/quick:text_corpus --data_dir=out/tfds --sentences=aligned \\
        --out=out/muvla_corpus_aligned
    # VinVL detections and any text (one sentence a line, .gz allowed)
    python -m jaxmuvla.build_corpus --images=vinvl:/data/cc/features.tsv,/data/cc/predictions.tsv \\
        --classes=/data/vinvl/labelmap.txt --corpus='/data/bookcorpus/*.txt.gz' --out=/data/muvla_corpus

Rerun the same command to resume (finished shards are kept; the result is byte-identical to an
uninterrupted build). With several processes (`--coordinator_address=HOST:PORT --num_processes=N
--process_id=I` on each) every process builds its own slice of the images. It prints the time of
each stage (images/s) and, for the world, how often the retrieved sentences and matched phrases
name the images' true objects, against random sentences and chance.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from vlcore.errors import InputError


def parse_args(argv: Sequence[str] | None):
    p = argparse.ArgumentParser(prog="python -m jaxmuvla.build_corpus", description=__doc__.split("\n")[0])
    p.add_argument("--images", required=True, help="world:CONFIG:SPLIT or vinvl:FEATURES_TSV,PREDICTIONS_TSV")
    p.add_argument("--corpus", required=True, help="tfds:NAME[/CONFIG]:SPLIT[:FEATURE] or text files (globs, .gz)")
    p.add_argument("--out", required=True, help="corpus directory to write (or resume)")
    p.add_argument("--encoder", default="", help="two_tower:WORKDIR: region features of world images")
    p.add_argument("--classes", default="", help="VinVL: the detector's class names, one a line")
    p.add_argument("--text_encoder", default="", help="BERT directory for sentence embeddings (default: bundled MiniLM)")
    p.add_argument("--data_dir", default=None, help="TFDS data dir")
    p.add_argument("--cache_dir", default=None, help="where corpus embeddings are kept (default: beside --out)")
    p.add_argument("--k", type=int, default=5, help="sentences per image")
    p.add_argument("--max_regions", type=int, default=10)
    p.add_argument("--min_confidence", type=float, default=0.2)
    p.add_argument("--min_area_ratio", type=float, default=0.01)
    p.add_argument("--feature", default="crop", choices=["crop", "patch"], help="world region features")
    p.add_argument("--no_attributes", action="store_true", help="tags and queries without attribute words")
    p.add_argument("--max_tokens", type=int, default=40)
    p.add_argument("--max_phrases", type=int, default=8)
    p.add_argument("--max_tag_tokens", type=int, default=32)
    p.add_argument("--images_per_shard", type=int, default=2048)
    p.add_argument("--index", default="exact", help="retrieval.backends kind searching the corpus")
    # the choices and the threshold's default are jaxmuvla.corpus's (checked there: importing it here
    # would make --help wait for JAX)
    p.add_argument("--match", default="word_vectors",
                   help="tag-phrase matching: word_vectors (the seed's: the class word against the phrase's "
                        "closest word, static GloVe vectors), class_sentence (the public code's: sentence "
                        "embeddings of the class word and the phrase), attribute_aware (word_vectors with the "
                        "region's attribute words in the tag)")
    p.add_argument("--match_threshold", type=float, default=None,
                   help="cosine below which a region has no phrase (-1: always the best phrase; default: "
                        "jaxmuvla.corpus.DEFAULT_MATCH_THRESHOLD)")
    p.add_argument("--sentences", default="retrieved",
                   help="retrieved: K sentences retrieved by the tags (weak alignment); aligned: each image's "
                        "own caption(s) (the paper's upper bound; world images only)")
    p.add_argument("--coordinator_address", default=None)
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    return p.parse_args(argv)


def image_source(args, settings):
    from jaxmuvla.corpus import CorpusBuildError, VinvlImages, WorldImages

    kind, _, spec = args.images.partition(":")
    if kind == "world":
        config, _, split = spec.partition(":")
        if not split or not args.encoder:
            raise CorpusBuildError("--images=world:CONFIG:SPLIT needs --encoder=two_tower:WORKDIR (region features)")
        from vlcore.frozen_encoders import TwoTowerEncoder
        from vlcore.training.mesh import process_zero_first
        from vlcore.world import builder as world

        enc_kind, _, workdir = args.encoder.partition(":")
        if enc_kind != "two_tower":
            raise CorpusBuildError(f"--encoder {args.encoder!r}: expected two_tower:WORKDIR")
        b = process_zero_first(lambda: world.prepare(args.data_dir, config=config), "world")
        return WorldImages(b, split, TwoTowerEncoder(Path(workdir)), settings)
    if kind == "vinvl":
        paths = spec.split(",")
        if len(paths) != 2 or not args.classes:
            raise CorpusBuildError("--images=vinvl:FEATURES_TSV,PREDICTIONS_TSV needs both files and --classes")
        classes = [c.strip() for c in Path(args.classes).read_text().splitlines() if c.strip()]
        return VinvlImages(paths[0], paths[1], classes, settings)
    raise CorpusBuildError(f"--images {args.images!r}: expected world:CONFIG:SPLIT or vinvl:FEATURES,PREDICTIONS")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from jaxmuvla.corpus import CorpusBuilder, CorpusSettings, WeaklyAlignedCorpus, build_corpus
    from jaxmuvla.regions import RegionSettings
    from jaxmuvla.sentence_bank import SentenceBank
    from vlcore.hf_checkpoint import load_tokenizer
    from vlcore.sentence_encoder import SentenceEncoder, bundled_minilm_path

    if args.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    start = time.perf_counter()
    try:
        regions = RegionSettings(max_regions=args.max_regions, min_confidence=args.min_confidence,
                                 min_area_ratio=args.min_area_ratio, feature=args.feature,
                                 attributes=not args.no_attributes)
        settings = CorpusSettings(k=args.k, max_tokens=args.max_tokens, max_phrases=args.max_phrases,
                                  max_tag_tokens=args.max_tag_tokens, images_per_shard=args.images_per_shard,
                                  index=args.index, regions=regions, match=args.match, sentences=args.sentences,
                                  **({} if args.match_threshold is None else {"match_threshold": args.match_threshold}))
        images = image_source(args, regions)
        text_path = args.text_encoder or bundled_minilm_path()
        encoder = SentenceEncoder(text_path)
        cache = args.cache_dir or str(Path(args.out).absolute().parent / "muvla_cache")
        from vlcore.training.mesh import process_zero_first

        bank = process_zero_first(lambda: SentenceBank.build(args.corpus, encoder, cache, data_dir=args.data_dir,
                                                             index_kind=args.index, progress=jax.process_index() == 0),
                                  "sentence-bank")
        builder = CorpusBuilder(images, bank, encoder, load_tokenizer(text_path), settings)
        manifest = build_corpus(args.out, builder, process_index=jax.process_index(),
                                process_count=jax.process_count(), progress=jax.process_index() == 0)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    times = builder.times
    report = {"out": args.out, "seconds": round(seconds, 1), "images_built_here": times.images,
              "images_per_s": {k: round(v, 1) for k, v in times.per_second().items()} if times.images else {}}
    if manifest is not None:
        report["totals"] = manifest["totals"]
        if args.images.startswith("world:") and jax.process_index() == 0:
            from jaxmuvla.corpus_quality import world_corpus_quality, world_objects

            corpus = WeaklyAlignedCorpus(args.out)
            objects = world_objects(images.builder, images.split, corpus.count)
            report["quality"] = world_corpus_quality(corpus, bank, objects, builder.tokenizer)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
