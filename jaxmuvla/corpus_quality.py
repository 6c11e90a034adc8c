"""How good a weakly aligned corpus of the embedded world is, against its ground truth.

  * sentences: the share of images whose top-1 (any of the top-K) retrieved sentences mention at
    least one of the image's true objects, by its coarse class (or plural), its fine name, or its
    colour together with its pattern ("mentions"), and the share that give a true object's look,
    colour and pattern ("looks": more than the category); against the same shares for sentences
    drawn at random from the corpus (seeded);
  * phrases: the share of (region, retrieved sentence) matches whose phrase names the region's true
    coarse class (the region's object: the one its box overlaps with IoU >= 0.5), against chance
    (a phrase of the same sentence drawn uniformly).
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
    texts = dict(zip(np.unique(index).tolist(), bank.text(np.unique(index))))
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
        shares[f"top1_{name}"] = np.mean([test(texts[index[i, 0]], objects[i]) for i in range(n)])
        shares[f"topk_{name}"] = np.mean([any(test(texts[j], objects[i]) for j in index[i]) for i in range(n)])
        shares[f"random_top1_{name}"] = np.mean([test(random_texts[random_index[i, 0]], objects[i]) for i in range(n)])
        shares[f"random_topk_{name}"] = np.mean([any(test(random_texts[j], objects[i]) for j in random_index[i])
                                                 for i in range(n)])

    boxes = np.asarray(a["region_boxes"][np.arange(n)])
    classes = np.asarray(a["region_class"][np.arange(n)])
    matches = np.asarray(a["region_phrase"][np.arange(n)])
    spans = np.asarray(a["phrase_spans"][np.arange(n)])
    tokens = np.asarray(a["sentence_ids"][np.arange(n)])
    named = chance = pairs = 0
    for i in range(n):
        for r in np.flatnonzero(classes[i] >= 0):
            overlaps = [_iou(boxes[i, r, :4], np.asarray(o["box"])) for o in objects[i]]
            if not overlaps or max(overlaps) < 0.5:
                continue  # a spurious detection: no true class to name
            coarse = objects[i][int(np.argmax(overlaps))]["coarse"]
            names = {taxonomy.COARSE_NAMES[coarse], taxonomy.COARSE_PLURALS[coarse]}
            for kk in range(k):
                phrases = [tokenizer.decode(tokens[i, kk, s:e]) for s, e in spans[i, kk] if s >= 0]
                if matches[i, kk, r] < 0 or not phrases:
                    continue
                says = [bool(names & _words(p)) for p in phrases]
                pairs += 1
                named += says[matches[i, kk, r]]
                chance += float(np.mean(says))
    return {"images": n, **{k: float(v) for k, v in shares.items()},
            "distinct_sentences": int(len(texts)), "matched_pairs": pairs, "phrase_names_region_class": named / max(pairs, 1),
            "phrase_chance": chance / max(pairs, 1)}


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
