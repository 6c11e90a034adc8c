"""The world's taxonomy: 6 coarse categories x 5 fine-grained subtypes, and the attribute words.

Coarse categories have ordinary English names and clearly distinct silhouettes. Each coarse
category has 5 subtypes with opaque proper names (pseudo-words that say nothing about the look);
a subtype is a (fill pattern, colour) combination drawn on its coarse category's silhouette.

Within a coarse category the 5 subtypes use 3 patterns and 3 colours arranged so that most
subtypes share their pattern with one sibling and their colour with another:

    slot 0: (P0, C0)   slot 1: (P1, C0)   slot 2: (P0, C1)   slot 3: (P2, C1)   slot 4: (P1, C2)

so telling subtypes apart needs both attributes (fine-grained), while the coarse category is
given by the silhouette alone. Patterns and colours are reused across coarse categories, so the
attribute words of web captions generalise across categories.

This module is pure Python + numpy (no TensorFlow); it is safe to import anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# --- coarse categories ---------------------------------------------------------------------

COARSE_NAMES: tuple[str, ...] = ("fish", "car", "boat", "kite", "plane", "flower")
COARSE_PLURALS: tuple[str, ...] = ("fish", "cars", "boats", "kites", "planes", "flowers")
# Silhouette of each coarse category (index-aligned with COARSE_NAMES); see render.shape_mask.
SHAPES: tuple[str, ...] = ("ellipse", "rectangle", "triangle", "diamond", "cross", "star")
# Words for the silhouette, used now and then by web captions.
SHAPE_WORDS: dict[str, str] = {
    "ellipse": "oval",
    "rectangle": "rectangular",
    "triangle": "triangular",
    "diamond": "diamond-shaped",
    "cross": "cross-shaped",
    "star": "star-shaped",
}
# Width / height of the silhouette before per-instance jitter.
BASE_ASPECT: dict[str, float] = {
    "ellipse": 1.45,
    "rectangle": 1.6,
    "triangle": 1.0,
    "diamond": 0.8,
    "cross": 1.0,
    "star": 1.0,
}

# --- attributes ------------------------------------------------------------------------------

COLOURS: tuple[str, ...] = ("red", "blue", "green", "yellow", "purple", "orange")
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "blue": (45, 85, 215),
    "green": (40, 160, 60),
    "yellow": (240, 205, 35),
    "purple": (140, 55, 185),
    "orange": (245, 135, 25),
}
# Pattern names as stored in the dataset (`objects/pattern`).
PATTERNS: tuple[str, ...] = (
    "plain",
    "horizontal stripes",
    "vertical stripes",
    "dots",
    "checker",
    "ring",
    "half",
)
# Adjectives ("a red {adj} fish") and "with ..." phrases ("a red fish with {phrase}") per pattern.
PATTERN_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "solid"),
    "horizontal stripes": ("horizontally striped",),
    "vertical stripes": ("vertically striped",),
    "dots": ("dotted", "spotted"),
    "checker": ("checkered",),
    "ring": ("bordered", "outlined"),
    "half": ("two-tone", "half-dark"),
}
PATTERN_PHRASES: dict[str, tuple[str, ...]] = {
    "plain": ("no pattern", "a plain finish"),
    "horizontal stripes": ("horizontal stripes",),
    "vertical stripes": ("vertical stripes",),
    "dots": ("dots", "spots"),
    "checker": ("a checker pattern", "checks"),
    "ring": ("a dark border", "a dark rim"),
    "half": ("a dark lower half",),
}

# --- fine-grained subtypes -------------------------------------------------------------------

# 30 opaque names: pronounceable pseudo-words drawn once from a fixed seed and hand-filtered so
# that no two share a character trigram, a first or a last letter pair, and none shares a trigram
# with the caption vocabulary (see tests/test_world.py). Index i is fine class i; the coarse
# category of fine class i is i // 5.
FINE_NAMES: tuple[str, ...] = (
    "zorblat", "quenvik", "reimdov", "kalpid", "vemguv",         # fish
    "fuzkox", "zeskul", "vosves", "drulgos", "naurdir",           # car
    "huvtiro", "flulkot", "keiskem", "lizfet", "vauzdix",         # boat
    "fozquav", "joumvuk", "snupgev", "grilfas", "jemkolt",        # kite
    "bamkak", "tismerk", "jaszusk", "plilvax", "vrenfol",         # plane
    "beiztil", "brurzok", "teirbur", "nimvar", "lumbom",          # flower
)
SUBTYPES_PER_COARSE = 5
NUM_COARSE = len(COARSE_NAMES)
NUM_FINE = len(FINE_NAMES)

# (pattern slot, colour slot) of the 5 subtypes of one coarse category (see module docstring).
_SLOTS: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (0, 1), (2, 1), (1, 2))


@dataclass(frozen=True)
class Subtype:
    """One fine-grained class."""

    index: int
    name: str
    coarse: int
    pattern: str
    colour: str

    @property
    def coarse_name(self) -> str:
        return COARSE_NAMES[self.coarse]

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOUR_RGB[self.colour]

    @property
    def shape(self) -> str:
        return SHAPES[self.coarse]


def _build_subtypes() -> tuple[Subtype, ...]:
    out = []
    for c in range(NUM_COARSE):
        pats = [PATTERNS[(3 * c + j) % len(PATTERNS)] for j in range(3)]
        cols = [COLOURS[(c + 2 * j) % len(COLOURS)] for j in range(3)]
        for k, (ps, cs) in enumerate(_SLOTS):
            i = c * SUBTYPES_PER_COARSE + k
            out.append(Subtype(i, FINE_NAMES[i], c, pats[ps], cols[cs]))
    return tuple(out)


SUBTYPES: tuple[Subtype, ...] = _build_subtypes()
FINE_TO_COARSE: np.ndarray = np.array([s.coarse for s in SUBTYPES], dtype=np.int32)
FINE_TO_COARSE.setflags(write=False)
# The subtypes the fusion_train split shows (3 of the 5 of each coarse category). The other 12 are
# novel to it: only the memory (and the test split) has them, so what a model knows of them at
# test time can only come from retrieval. This is RECO's setting: the fusion trains on one
# dataset (CC12M) and is evaluated on classes that dataset hardly has (CUB's species).
FUSION_TRAIN_CLASSES: tuple[int, ...] = tuple(s.index for s in SUBTYPES if s.index % SUBTYPES_PER_COARSE < 3)
# int32 [30], read-only: the coarse label of each fine label (`fine_to_coarse[fine]`).
fine_to_coarse: np.ndarray = FINE_TO_COARSE


def fine_names() -> list[str]:
    """The 30 fine class names, index = fine label."""
    return list(FINE_NAMES)


def coarse_names() -> list[str]:
    """The 6 coarse class names, index = coarse label."""
    return list(COARSE_NAMES)


def attribute_words() -> set[str]:
    """Every word the captions use to describe what is visible (colours, patterns, shapes, classes)."""
    words: set[str] = set(COARSE_NAMES) | set(COARSE_PLURALS) | set(COLOURS)
    for group in (PATTERNS, *PATTERN_ADJECTIVES.values(), *PATTERN_PHRASES.values(), SHAPE_WORDS.values()):
        for phrase in group:
            words.update(phrase.split())  # hyphenated words ("two-tone") stay whole
    return words - {"a", "an", "no", "the", "with", "of"}


# Other words of the caption templates (positions, relations, counts, glue).
CAPTION_WORDS: tuple[str, ...] = (
    "top", "bottom", "left", "right", "centre", "above", "below", "next", "photo", "picture",
    "image", "close-up", "light", "background", "there", "objects", "including", "kind", "type",
    "which", "this", "two", "three", "four", "and", "to", "in", "on", "at", "is",
)


def caption_vocabulary() -> set[str]:
    """attribute_words() plus the other words of the caption templates (not the fine names)."""
    return attribute_words() | set(CAPTION_WORDS)


# --- zero-shot prompts -----------------------------------------------------------------------

CLASSIFICATION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a drawing of a {}.",
    "a close-up photo of a {}.",
)


def class_prompts(
    level: str = "fine", with_coarse: bool = True, templates: tuple[str, ...] | list[str] | None = None
) -> list[list[str]]:
    """Zero-shot prompts: one list of prompts (one per template) per class, in label order.

    level="fine": the opaque subtype name, by default with its coarse category
    ("a photo of a zorblat, a type of fish."); with_coarse=False gives "a photo of a zorblat.".
    level="coarse": "a photo of a fish.".
    """
    templates = tuple(templates) if templates is not None else CLASSIFICATION_TEMPLATES
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("every template must contain '{}'")
    if level == "fine":
        labels = [
            f"{s.name}, a type of {s.coarse_name}" if with_coarse else s.name for s in SUBTYPES
        ]
    elif level == "coarse":
        labels = list(COARSE_NAMES)
    else:
        raise ValueError(f"level must be 'fine' or 'coarse', got {level!r}")
    return [[t.format(label) for t in templates] for label in labels]
