"""jaxmuvla.phrases: spaCy noun chunks with a reduced pipeline, and their BERT word-piece spans."""

from __future__ import annotations

import numpy as np
import pytest

from jaxmuvla.phrases import DEFAULT_MODEL, NounPhraser, Phrase, SpanStats, wordpiece_spans

HAND_MADE = [
    "A red fish swims to the right of a vertically striped fish.",
    "three objects, including a purple boat with horizontal stripes",
    "The two-tone plane and the blue car are parked near Paris.",
    "She gave him the old wooden kite yesterday",
    "a yellow outlined car next to a blue flower with dots",
    "Dr. Smith's dog, a small terrier, barked at the mailman and his bicycle.",
    "It rained.",
    "Run quickly!",  # no noun phrase
    "",  # nothing at all
    "  leading and trailing spaces around a green boat  ",
    "the match ended in a draw after extra time",
]


@pytest.fixture(scope="module")
def phraser() -> NounPhraser:
    return NounPhraser()


@pytest.fixture(scope="module")
def full_nlp():
    import spacy

    return spacy.load(DEFAULT_MODEL)  # every pipe, as the model ships


@pytest.fixture(scope="module")
def tokenizer():
    from vlcore.hf_checkpoint import load_tokenizer
    from vlcore.sentence_encoder import bundled_minilm_path

    return load_tokenizer(bundled_minilm_path())


@pytest.fixture(scope="module")
def tiny_corpus() -> list[str]:
    """The tiny world's text_corpus sentences, made directly (no TFDS write needed)."""
    from vlcore.world.builder import TINY
    from vlcore.world.examples import generate

    return [ex["caption"] for _, ex in generate(TINY.seed, "text_corpus", TINY.text_corpus, TINY.name_prob, workers=1)]


def _full_chunks(nlp, sentences):
    return [[Phrase(c.text, c.start_char, c.end_char) for c in doc.noun_chunks] for doc in nlp.pipe(sentences)]


# --- NounPhraser --------------------------------------------------------------------------------


def test_only_the_pipes_noun_chunks_needs(phraser, full_nlp):
    assert phraser.pipe_names == ["tok2vec", "tagger", "parser", "attribute_ruler"]
    assert set(phraser.excluded) == {"senter", "lemmatizer", "ner"}
    assert set(phraser.excluded).isdisjoint(phraser.nlp.component_names)  # not even loaded


def test_chunks_equal_the_full_pipeline(phraser, full_nlp, tiny_corpus):
    sentences = HAND_MADE + tiny_corpus
    got = phraser.phrases(sentences, batch_size=7)
    assert got == _full_chunks(full_nlp, sentences)
    for sentence, found in zip(sentences, got):
        assert all(sentence[p.start_char:p.end_char] == p.text for p in found)
    assert sum(map(len, got)) > 2 * len(sentences)  # the test is not vacuous


def test_no_noun_phrase_gives_empty_list(phraser):
    assert phraser.phrases(["Run quickly!", "", "a red car"]) == [[], [], [Phrase("a red car", 0, 9)]]
    assert phraser.phrases([]) == []
    assert phraser.phrases(np.array(["Run quickly!", "a red car"])) == [[], [Phrase("a red car", 0, 9)]]


def test_repeated_sentences_parsed_once_and_fresh_lists(phraser):
    small = NounPhraser(cache_size=2)
    first = small.phrases(["a red car", "a blue fish", "a red car"])
    assert first[0] == first[2] and first[0] is not first[2]
    first[0].append(Phrase("x", 0, 1))  # a caller editing its list changes nothing cached
    assert small.phrases(["a red car"]) == [[Phrase("a red car", 0, 9)]]
    small.phrases(["one kite", "two kites", "three kites"])
    assert len(small._cache) == 2  # bounded LRU


# --- wordpiece_spans ----------------------------------------------------------------------------


def test_spans_decode_to_every_phrase_of_the_tiny_corpus(phraser, tokenizer, tiny_corpus):
    found = phraser.phrases(tiny_corpus)
    max_phrases = max(map(len, found))
    stats = SpanStats()
    ids, spans = wordpiece_spans(tokenizer, tiny_corpus, found, max_length=64, max_phrases=max_phrases, stats=stats)
    assert ids.shape == (len(tiny_corpus), 64) and ids.dtype == np.int32
    assert spans.shape == (len(tiny_corpus), max_phrases, 2) and spans.dtype == np.int32
    assert stats == SpanStats(phrases=sum(map(len, found)), kept=sum(map(len, found)))
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    for i, (sentence, phrases) in enumerate(zip(tiny_corpus, found)):
        expected = tokenizer(sentence)["input_ids"]
        assert ids[i, :len(expected)].tolist() == expected and (ids[i, len(expected):] == 0).all()
        offsets = tokenizer(sentence, return_offsets_mapping=True)["offset_mapping"]
        for k, phrase in enumerate(phrases):
            start, end = spans[i, k]
            assert 1 <= start < end <= len(expected) - 1  # inside [CLS] ... [SEP]
            # decode puts spaces around word-piece boundaries ("two - tone"): compare without them
            decoded = tokenizer.decode(ids[i, start:end])
            assert decoded.replace(" ", "") == phrase.text.lower().replace(" ", ""), (sentence, phrase)
            assert offsets[start][0] == phrase.start_char and offsets[end - 1][1] == phrase.end_char
        assert (spans[i, len(phrases):] == -1).all()


def test_truncation_drops_phrases_that_do_not_fit(tokenizer):
    sentence = "a red car near a vertically striped fish and the blue kite"
    phrases = [Phrase("a red car", 0, 9), Phrase("a vertically striped fish", 15, 40), Phrase("the blue kite", 45, 58)]
    assert [sentence[p.start_char:p.end_char] for p in phrases] == [p.text for p in phrases]
    full = tokenizer(sentence)["input_ids"]  # [CLS] a red car near a vertically striped fish and the blue kite [SEP]
    assert len(full) == 14
    ids, spans = wordpiece_spans(tokenizer, [sentence], [phrases], max_length=64, max_phrases=4)
    assert spans[0].tolist() == [[1, 4], [5, 9], [10, 13], [-1, -1]]

    # 8 positions: [CLS] a red car near a vertically striped [SEP]: "fish" is cut, so is the kite
    stats = SpanStats()
    ids, spans = wordpiece_spans(tokenizer, [sentence], [phrases], max_length=8, max_phrases=4, stats=stats)
    assert ids[0].tolist() == full[:7] + [tokenizer.sep_token_id]
    assert spans[0].tolist() == [[1, 4], [-1, -1], [-1, -1], [-1, -1]]
    assert stats == SpanStats(phrases=3, kept=1, truncated=2)

    # exactly fitting (14 positions, nothing truncated): everything kept
    _, spans = wordpiece_spans(tokenizer, [sentence], [phrases], max_length=14, max_phrases=4)
    assert spans[0, :3].tolist() == [[1, 4], [5, 9], [10, 13]]


def test_max_phrases_and_padding(tokenizer):
    sentences = ["a red car near a blue fish and the green kite", "hi", "the boat"]
    phrases = [[Phrase("a red car", 0, 9), Phrase("a blue fish", 15, 26), Phrase("the green kite", 31, 45)], [],
               [Phrase("the boat", 0, 8)]]
    stats = SpanStats()
    ids, spans = wordpiece_spans(tokenizer, sentences, phrases, max_length=16, max_phrases=2, stats=stats)
    assert stats == SpanStats(phrases=4, kept=3, over_max=1)
    assert spans.tolist() == [[[1, 4], [5, 8]], [[-1, -1], [-1, -1]], [[1, 3], [-1, -1]]]
    assert ids[1].tolist() == [tokenizer.cls_token_id, *tokenizer("hi", add_special_tokens=False)["input_ids"],
                               tokenizer.sep_token_id] + [0] * 13
    assert tokenizer.pad_token_id == 0

    # a numpy array of sentences (what a sentence bank hands over) works the same
    ids_np, spans_np = wordpiece_spans(tokenizer, np.array(sentences), phrases, max_length=16, max_phrases=2)
    assert (ids_np == ids).all() and (spans_np == spans).all()

    ids, spans = wordpiece_spans(tokenizer, [], [], max_length=16, max_phrases=2)
    assert ids.shape == (0, 16) and spans.shape == (0, 2, 2)
    with pytest.raises(ValueError, match="phrase lists"):
        wordpiece_spans(tokenizer, ["a"], [], max_length=16)
