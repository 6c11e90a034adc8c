"""How good a weakly aligned corpus of the embedded world is, against its ground truth.

  * sentences: the share of images whose top-1 (any of the top-K) retrieved sentences mention at
    least one of the image's true objects, by its coarse class (or plural), its fine name, or its
    colour together with its pattern ("mentions"), and the share that give a true object's look,
    colour and pattern ("looks": more than the category); against the same shares for sentences
    drawn at random from the corpus (seeded);
  * phrase matches (`match_quality`): precision and recall of the stored (region, phrase) matches
    against the region's true object (the one its box overlaps with IoU >= 0.5): does the phrase
    name its class, and its look (colour and pattern)? Against chance (a phrase of the same
    sentence drawn uniformly).
"""

from __future__ import annotations

import numpy as np

from vlcore.world import taxonomy


def _words(sentence: str) -> set[str]:
    return set(sentence.lower().replace(",", " ").replace(".", " ").split())


def mentions(sentence_words: set[str], sentence: str, obj: dict) -> bool:
    """Whether a sentence names an object: coarse class or plural, fine name, or colour + pattern."""
    coarse = taxonomy.COARSE_NAMES[obj["coarse"]]
    if coarse in sentence_words or taxonomy.COARSE_PLURALS[obj["coarse"]] in sentence_words:
        return True
    if taxonomy.FINE_NAMES[obj["fine"]] in sentence_words:
        return True
    return describes_look(sentence_words, sentence, obj)


def describes_look(sentence_words: set[str], sentence: str, obj: dict) -> bool:
    """Whether a sentence gives an object's look: its colour and its pattern (more than the category)."""
    pattern_words = (*taxonomy.PATTERN_ADJECTIVES[obj["pattern"]], *taxonomy.PATTERN_PHRASES[obj["pattern"]])
    return obj["colour"] in sentence_words and any(p in sentence.lower() for p in pattern_words)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two (x1, y1, x2, y2) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def world_corpus_quality(corpus, bank, objects: list[list[dict]], tokenizer, seed: int = 0) -> dict[str, float]:
    """corpus: a `WeaklyAlignedCorpus` of world images; bank: its `SentenceBank`; objects[i]: image i's
    true objects as dicts (box (x1, y1, x2, y2) normalised, coarse, fine, colour, pattern)."""
    a = corpus.arrays
    n = corpus.count
    index = np.asarray(a["sentence_index"][np.arange(n)])
    k = index.shape[1]
    tokens = np.asarray(a["sentence_ids"][np.arange(n)])
    from_bank = np.unique(index[index >= 0])
    texts = dict(zip(from_bank.tolist(), bank.text(from_bank)))
    # sentences not from the text corpus (sentences="aligned": the image's caption), from their word pieces
    sentence = [[texts[index[i, j]] if index[i, j] >= 0 else _decode(tokenizer, tokens[i, j]) for j in range(k)]
                for i in range(n)]
    rng = np.random.default_rng(seed)
    random_index = rng.integers(0, bank.count, size=(n, k))
    random_texts = dict(zip(np.unique(random_index).tolist(), bank.text(np.unique(random_index))))

    def hit(text: str, objs) -> bool:
        words = _words(text)
        return any(mentions(words, text, o) for o in objs)

    def look(text: str, objs) -> bool:
        words = _words(text)
        return any(describes_look(words, text, o) for o in objs)

    shares = {}
    for name, test in (("mentions", hit), ("looks", look)):
        shares[f"top1_{name}"] = np.mean([test(sentence[i][0], objects[i]) for i in range(n)])
        shares[f"topk_{name}"] = np.mean([any(test(x, objects[i]) for x in sentence[i]) for i in range(n)])
        shares[f"random_top1_{name}"] = np.mean([test(random_texts[random_index[i, 0]], objects[i]) for i in range(n)])
        shares[f"random_topk_{name}"] = np.mean([any(test(random_texts[j], objects[i]) for j in random_index[i])
                                                 for i in range(n)])
    # distinct text-corpus positions, and distinct sentences from elsewhere (aligned captions)
    distinct = len(texts) + len({sentence[i][j] for i, j in zip(*np.nonzero(index < 0))})
    return {"images": n, **{k: float(v) for k, v in shares.items()}, "distinct_sentences": distinct,
            **match_quality(corpus, objects, tokenizer)}


def match_quality(corpus, objects: list[list[dict]], tokenizer) -> dict[str, float]:
    """How well the stored tag-phrase matches name the regions' true objects.

    Counted over (region, sentence) pairs whose region's box overlaps a true object with IoU >= 0.5
    (spurious detections have nothing true to name) and whose sentence has a phrase. A phrase
    "names the class" when it holds the object's coarse class (or plural) or its fine name, and
    "names the look" when it also gives the object's colour and pattern. Class precision: of the
    matched pairs, the share whose phrase names the class; look precision: of the matched pairs whose
    phrase names the class and some colour, the share whose phrase gives the object's own colour and
    pattern (does the match tell same-class objects apart?); recall: of the pairs where some phrase
    of the sentence names the class (the look), the share matched to such a phrase. matched: the
    share of pairs with a match (a threshold leaves some out). chance: the class precision of a
    phrase of the same sentence drawn uniformly.
    """
    a = corpus.arrays
    n = corpus.count
    boxes = np.asarray(a["region_boxes"][np.arange(n)])
    classes = np.asarray(a["region_class"][np.arange(n)])
    matches = np.asarray(a["region_phrase"][np.arange(n)])
    spans = np.asarray(a["phrase_spans"][np.arange(n)])
    tokens = np.asarray(a["sentence_ids"][np.arange(n)])
    counts = dict.fromkeys(("pairs", "matched", "class_ok", "class_any", "coloured", "look_ok", "look_any"), 0)
    chance = 0.0
    for i in range(n):
        for r in np.flatnonzero(classes[i] >= 0):
            overlaps = [_iou(boxes[i, r, :4], np.asarray(o["box"])) for o in objects[i]]
            if not overlaps or max(overlaps) < 0.5:
                continue
            obj = objects[i][int(np.argmax(overlaps))]
            names = {taxonomy.COARSE_NAMES[obj["coarse"]], taxonomy.COARSE_PLURALS[obj["coarse"]],
                     taxonomy.FINE_NAMES[obj["fine"]]}
            for kk in range(spans.shape[1]):
                phrases = [_decode(tokenizer, tokens[i, kk, s:e]) for s, e in spans[i, kk] if s >= 0]
                if not phrases:
                    continue
                says = [bool(names & _words(p)) for p in phrases]
                looks = [c and describes_look(_words(p), p, obj) for c, p in zip(says, phrases)]
                m = int(matches[i, kk, r])
                counts["pairs"] += 1
                counts["class_any"] += any(says)
                counts["look_any"] += any(looks)
                chance += float(np.mean(says))
                if m >= 0:
                    counts["matched"] += 1
                    counts["class_ok"] += says[m]
                    counts["look_ok"] += looks[m]
                    counts["coloured"] += says[m] and bool(_words(phrases[m]) & set(taxonomy.COLOURS))
    c = counts
    return {"matched_pairs": c["matched"], "region_sentence_pairs": c["pairs"],
            "match_matched_share": c["matched"] / max(c["pairs"], 1),
            "match_class_precision": c["class_ok"] / max(c["matched"], 1),
            "match_class_recall": c["class_ok"] / max(c["class_any"], 1),
            "match_look_precision": c["look_ok"] / max(c["coloured"], 1),
            "match_look_recall": c["look_ok"] / max(c["look_any"], 1),
            "match_class_chance": chance / max(c["pairs"], 1)}


def _decode(tokenizer, ids) -> str:
    """Word pieces back to lowercase text (padding and [CLS]/[SEP] dropped; "two - tone" rejoined)."""
    return tokenizer.decode([int(x) for x in ids if x > 0], skip_special_tokens=True).replace(" - ", "-")


def world_objects(builder, split: str, count: int) -> list[list[dict]]:
    """The true objects of the first `count` images of a world split (boxes as x1, y1, x2, y2)."""
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(split=f"{split}[:{count}]", shuffle_files=False).map(lambda e: e["objects"])
    out = []
    for o in tfds.as_numpy(ds):
        out.append([{"box": np.asarray(b)[[1, 0, 3, 2]], "coarse": int(c), "fine": int(f),
                     "colour": col.decode(), "pattern": pat.decode()}
                    for b, c, f, col, pat in zip(o["bbox"], o["coarse_label"], o["fine_label"], o["colour"],
                                                 o["pattern"])])
    return out
