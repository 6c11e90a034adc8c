"""jaxmuvla.text_corpus: TFDS and plain-file sources, streamed; errors; fingerprints."""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import pytest

from jaxmuvla.text_corpus import CorpusError, CorpusStats, corpus_fingerprint, iter_sentences

TINY = "tfds:vl_world/tiny:text_corpus"


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    """An empty data_dir in which the first read generates the tiny world (as iter_sentences must)."""
    from vlcore.world import builder

    data_dir = tmp_path_factory.mktemp("world")
    assert not builder.builder(data_dir, "tiny").is_prepared()
    first = next(iter_sentences(TINY, data_dir=data_dir))
    assert first and builder.builder(data_dir, "tiny").is_prepared()
    return data_dir


def _write(path: Path, text: str | bytes) -> Path:
    data = text.encode() if isinstance(text, str) else text
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


# --- TFDS ---------------------------------------------------------------------------------------


def test_tfds_text_corpus_equals_tfds_load(world_dir):
    import tensorflow_datasets as tfds

    ds = tfds.load("vl_world/tiny", split="text_corpus", data_dir=str(world_dir), shuffle_files=False, download=False)
    expected = [ex["caption"].decode() for ex in tfds.as_numpy(ds)]
    stats = CorpusStats()
    got = list(iter_sentences(TINY, data_dir=world_dir, stats=stats))
    assert got == expected and len(got) == 100
    assert stats == CorpusStats(sentences=100, empty=0)
    # the sentences the world generator makes (what tests/test_phrases.py uses), in TFDS's
    # shuffled-on-write order
    from vlcore.world.builder import TINY as TINY_CONFIG
    from vlcore.world.examples import generate

    made = generate(TINY_CONFIG.seed, "text_corpus", TINY_CONFIG.text_corpus, TINY_CONFIG.name_prob, workers=1)
    assert sorted(ex["caption"] for _, ex in made) == sorted(got)
    # `caption` is the default feature of vl_world (it has no `text`)
    assert list(iter_sentences(TINY + ":caption", data_dir=world_dir)) == expected
    # split slicing the TFDS way, and a sum of splits
    assert list(iter_sentences("tfds:vl_world/tiny:text_corpus[:10]+text_corpus[90:]", data_dir=world_dir)) == (
        expected[:10] + expected[90:])


def test_tfds_nested_list_feature_yields_each_text(world_dir):
    import tensorflow_datasets as tfds

    ds = tfds.load("vl_world/tiny", split="web", data_dir=str(world_dir), shuffle_files=False, download=False)
    expected = [c.decode() for ex in tfds.as_numpy(ds) for c in ex["objects"]["colour"]]
    assert len(expected) > 100  # several objects per image
    assert list(iter_sentences("tfds:vl_world/tiny:web:objects/colour", data_dir=world_dir)) == expected


@pytest.mark.parametrize("source, named", [
    ("tfds:vl_world/tiny:no_such_split", "no_such_split"),
    ("tfds:vl_world/tiny:text_corpus:no_such_feature", "no_such_feature"),
    ("tfds:vl_world/tiny:text_corpus:objects/nope", "objects/nope"),
    ("tfds:vl_world/tiny:text_corpus:image", "image"),  # not a text feature
    ("tfds:vl_world/no_such_config:text_corpus", "no_such_config"),
    ("tfds:no_such_dataset_xyz:train", "no_such_dataset_xyz"),
    ("tfds:vl_world/tiny", "tfds:NAME[/CONFIG]:SPLIT"),  # no split
])
def test_tfds_errors_name_what_is_wrong(world_dir, source, named):
    with pytest.raises(CorpusError, match=re.escape(named)) as exc:
        iter_sentences(source, data_dir=world_dir)  # checked before iterating
    assert "\n" not in str(exc.value)


def test_tfds_fingerprint(world_dir):
    fp = corpus_fingerprint(TINY, world_dir)
    assert len(fp) == 64 and fp == corpus_fingerprint(TINY + ":caption", world_dir)  # the resolved feature
    assert fp != corpus_fingerprint("tfds:vl_world/tiny:web", world_dir)
    assert fp != corpus_fingerprint(TINY + "[:50]", world_dir)
    assert corpus_fingerprint(TINY, world_dir, content=True) == corpus_fingerprint(TINY + ":caption", world_dir,
                                                                                   content=True)


# --- plain files --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["corpus.txt", "corpus.txt.gz"])
def test_file_lines_stripped_empty_skipped_and_counted(tmp_path, name):
    path = _write(tmp_path / name, "\ufeffa red car\n\n  two fish \t\r\n   \nnaïve café\n\n")
    stats = CorpusStats()
    assert list(iter_sentences(str(path), stats=stats)) == ["a red car", "two fish", "naïve café"]
    assert stats == CorpusStats(sentences=3, empty=3)


def test_globs_and_lists_in_order_each_file_once(tmp_path):
    _write(tmp_path / "b.txt", "b1\nb2\n")
    _write(tmp_path / "a.txt", "a1\n")
    _write(tmp_path / "c.txt.gz", "c1\n")
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "d.txt", "d1\n")
    assert list(iter_sentences(f"{tmp_path}/*.txt")) == ["a1", "b1", "b2"]  # a glob's matches sorted
    source = f"{tmp_path}/c.txt.gz, {tmp_path}/*.txt,{tmp_path}/b.txt,{tmp_path}/**/d.txt"
    assert list(iter_sentences(source)) == ["c1", "a1", "b1", "b2", "d1"]  # b.txt named twice: read once


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(CorpusError, match=f"{re.escape(str(missing))}: no such file"):
        iter_sentences(f"{_write(tmp_path / 'ok.txt', 'x')},{missing}")
    with pytest.raises(CorpusError, match="nothing_\\*.txt: no file matches"):
        iter_sentences(str(tmp_path / "nothing_*.txt"))
    with pytest.raises(CorpusError, match="not a regular file"):
        iter_sentences(str(tmp_path))
    with pytest.raises(CorpusError, match="empty text corpus source"):
        iter_sentences(" , ")

    blank = _write(tmp_path / "blank.txt", "\n  \n\n")
    with pytest.raises(CorpusError, match=f"{re.escape(str(blank))}: empty corpus"):
        list(iter_sentences(str(blank)))

    latin1 = _write(tmp_path / "latin1.txt", "fine\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=f"{re.escape(str(latin1))}: line 2 is not UTF-8"):
        list(iter_sentences(str(latin1)))

    not_gzip = _write(tmp_path / "plain.txt", "plain text")
    os.rename(not_gzip, tmp_path / "plain.gz")
    with pytest.raises(CorpusError, match="plain.gz: not a readable gzip file"):
        list(iter_sentences(str(tmp_path / "plain.gz")))


@pytest.mark.parametrize("name", ["big.txt", "big.txt.gz"])
def test_files_are_streamed(tmp_path, name):
    # ~3 MB of good lines, then a byte that is not UTF-8: reading it all fails, while the first
    # sentence comes out without the reader getting anywhere near it.
    good = b"".join(b"sentence number %d about a red car\n" % i for i in range(100_000))
    path = _write(tmp_path / name, good + b"bad \xff byte\n")
    sentences = iter_sentences(str(path))
    assert next(sentences) == "sentence number 0 about a red car"
    assert next(sentences) == "sentence number 1 about a red car"
    with pytest.raises(CorpusError, match="line 100001 is not UTF-8"):
        for _ in sentences:
            pass


def test_file_fingerprint(tmp_path):
    a = _write(tmp_path / "a.txt", "one\ntwo\n")
    b = _write(tmp_path / "b.txt", "one\n\ntwo\n")
    fp = corpus_fingerprint(str(a))
    assert len(fp) == 64 and fp == corpus_fingerprint(str(a)) and fp != corpus_fingerprint(str(b))
    assert corpus_fingerprint(f"{a},{b}") != corpus_fingerprint(f"{b},{a}")  # the reading order counts
    # by content, the same sentences give the same fingerprint whatever the files
    assert corpus_fingerprint(str(a), content=True) == corpus_fingerprint(str(b), content=True)
    os.utime(a, ns=(1, 1))
    assert corpus_fingerprint(str(a)) != fp  # a new mtime: maybe new content
