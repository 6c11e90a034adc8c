"""Scene sampling, scene graphs, a simulated detector, captions and distractor sentences.

A scene has 1-4 objects; object 0 is the *main* object: the one with the largest bounding box
(strictly larger than every other). Boxes are tight pixel boxes [ymin, xmin, ymax, xmax) of the
drawn silhouette (max exclusive), computed from the same masks `render` draws.

Split kinds (`sample_scene(rng, kind)`):
  - "test": one dominant object (55 %) or one large object (24-30 px) + 1-2 small distractors
    (14-17 px), so the main object's label is unambiguous.
  - "web", "memory", "fusion_train", "text_corpus": 1-4 objects of 14-30 px.

Everything here is pure numpy and deterministic given the numpy Generator passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from vlcore.world import render as _render
from vlcore.world.taxonomy import (
    BASE_ASPECT,
    COARSE_NAMES,
    COARSE_PLURALS,
    COLOURS,
    NUM_FINE,
    PATTERN_ADJECTIVES,
    PATTERN_PHRASES,
    PATTERNS,
    SHAPE_WORDS,
    SHAPES,
    SUBTYPES,
)

SPLIT_KINDS = ("web", "memory", "fusion_train", "test", "text_corpus")
RELATIONS = ("left of", "right of", "above", "below")
DEFAULT_NAME_PROB = 0.03

# Simulated detector noise.
DETECTOR_WRONG_PROB = 0.10  # an object's tag gets a wrong coarse class (with lower confidence)
DETECTOR_SPURIOUS_PROB = 0.15  # per image: one extra low-confidence detection of nothing
DETECTOR_BOX_JITTER = 3  # px, max shift of each box edge
ATTRIBUTE_RIGHT_PROB = 0.8  # the attribute head names an object's true colour (pattern) this often
ATTRIBUTE_DROP_PROB = 0.15  # and leaves each word out this often

_MAX_OVERLAP = 0.15  # max intersection / smaller box area between two objects
_NUMBERS = ("zero", "one", "two", "three", "four")


@dataclass(frozen=True)
class SceneObject:
    """One drawn object. Geometry in pixels; `box` = (ymin, xmin, ymax, xmax), max exclusive."""

    fine: int
    coarse: int
    colour: str
    pattern: str
    rgb: tuple[int, int, int]  # jittered fill colour
    half_h: float  # half-extents of the silhouette before rotation
    half_w: float
    angle: float  # radians
    frac_y: float  # sub-pixel phase of the centre w.r.t. the anchor pixel
    frac_x: float
    period: float  # pattern scale in px (stripe width; dots / checks are derived from it)
    phase_u: float
    phase_v: float
    anchor_y: int = 0
    anchor_x: int = 0
    box: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def shape(self) -> str:
        return SHAPES[self.coarse]

    @property
    def fine_name(self) -> str:
        return SUBTYPES[self.fine].name

    @property
    def coarse_name(self) -> str:
        return COARSE_NAMES[self.coarse]

    @property
    def area(self) -> int:
        y0, x0, y1, x1 = self.box
        return (y1 - y0) * (x1 - x0)

    @property
    def centre(self) -> tuple[float, float]:
        y0, x0, y1, x1 = self.box
        return (y0 + y1) / 2.0, (x0 + x1) / 2.0


@dataclass(frozen=True)
class Scene:
    size: int
    kind: str
    objects: tuple[SceneObject, ...]  # objects[0] is the main object
    background_rgb: tuple[int, int, int]
    texture: tuple[tuple[float, float, float, float], ...]  # (amplitude, fy, fx, phase) sinusoids
    noise_std: float
    noise_seed: int

    @property
    def main(self) -> SceneObject:
        return self.objects[0]


@dataclass(frozen=True)
class Tag:
    """One simulated detection: pixel box (ymin, xmin, ymax, xmax), coarse class name, confidence,
    and the index of the scene object it detects (-1 for a spurious detection of nothing)."""

    box: tuple[float, float, float, float]
    label: str
    confidence: float
    object_index: int = -1


# --- sampling ------------------------------------------------------------------------------


def _sample_object(rng: np.random.Generator, fine: int, size_px: float) -> SceneObject:
    st = SUBTYPES[fine]
    aspect = BASE_ASPECT[st.shape] * math.exp(rng.uniform(-0.12, 0.12))
    if aspect >= 1.0:
        half_w, half_h = size_px / 2.0, size_px / 2.0 / aspect
    else:
        half_h, half_w = size_px / 2.0, size_px / 2.0 * aspect
    base = np.asarray(st.rgb, np.float64)
    rgb = np.clip(np.rint(base * rng.uniform(0.9, 1.1) + rng.normal(0.0, 8.0, 3)), 0, 255).astype(int)
    return SceneObject(
        fine=fine,
        coarse=st.coarse,
        colour=st.colour,
        pattern=st.pattern,
        rgb=(int(rgb[0]), int(rgb[1]), int(rgb[2])),
        half_h=float(half_h),
        half_w=float(half_w),
        angle=float(np.deg2rad(rng.uniform(-15.0, 15.0))),
        frac_y=float(rng.uniform()),
        frac_x=float(rng.uniform()),
        period=float(rng.uniform(2.2, 3.0)),
        phase_u=float(rng.uniform(0.0, 6.0)),
        phase_v=float(rng.uniform(0.0, 6.0)),
    )


def _local_box(obj: SceneObject) -> tuple[int, int, int, int]:
    """Tight box of the drawn pixels relative to the anchor (max exclusive)."""
    mask, _, r = _render.object_layers(obj, pattern=False)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0] - r), int(cols[0] - r), int(rows[-1] - r + 1), int(cols[-1] - r + 1)


def _overlap_ok(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    y0, x0, y1, x1 = box
    a = (y1 - y0) * (x1 - x0)
    for oy0, ox0, oy1, ox1 in others:
        ih = min(y1, oy1) - max(y0, oy0)
        iw = min(x1, ox1) - max(x0, ox0)
        if ih > 0 and iw > 0:
            b = (oy1 - oy0) * (ox1 - ox0)
            if ih * iw > _MAX_OVERLAP * min(a, b):
                return False
    return True


def _place(
    rng: np.random.Generator, obj: SceneObject, local: tuple[int, int, int, int], size: int,
    others: list[tuple[int, int, int, int]], tries: int = 40,
) -> SceneObject | None:
    ly0, lx0, ly1, lx1 = local
    lo_y, hi_y = 1 - ly0, size - 1 - ly1  # keep a 1 px margin
    lo_x, hi_x = 1 - lx0, size - 1 - lx1
    if hi_y < lo_y or hi_x < lo_x:
        return None
    for _ in range(tries):
        ay = int(rng.integers(lo_y, hi_y + 1))
        ax = int(rng.integers(lo_x, hi_x + 1))
        box = (ay + ly0, ax + lx0, ay + ly1, ax + lx1)
        if _overlap_ok(box, others):
            return replace(obj, anchor_y=ay, anchor_x=ax, box=box)
    return None


def _area(b: tuple[int, int, int, int]) -> int:
    return (b[2] - b[0]) * (b[3] - b[1])


def sample_scene(
    rng: np.random.Generator,
    split_kind: str,
    main_fine: int | None = None,
    n_objects: int | None = None,
    size: int = 64,
) -> Scene:
    """Samples a scene. main_fine fixes the main object's fine class; n_objects forces the count."""
    if split_kind not in SPLIT_KINDS:
        raise ValueError(f"unknown split kind {split_kind!r}; expected one of {SPLIT_KINDS}")
    if n_objects is not None and not 1 <= n_objects <= 4:
        raise ValueError(f"n_objects must be in 1..4, got {n_objects}")
    scale = size / 64.0
    if main_fine is None:
        main_fine = int(rng.integers(NUM_FINE))
    if split_kind == "test":
        n = n_objects or (1 if rng.random() < 0.55 else int(rng.integers(2, 4)))
        main_size = rng.uniform(24.0, 30.0) * scale
        other_sizes = list(rng.uniform(14.0, 17.0, n - 1) * scale)
    else:
        n = n_objects or int(rng.choice([1, 2, 3, 4], p=[0.35, 0.3, 0.2, 0.15]))
        sizes = np.sort(rng.uniform(14.0, 30.0, n) * scale)[::-1]
        main_size, other_sizes = float(sizes[0]), [float(s) for s in sizes[1:]]

    # main object: placed first, always fits
    main = _sample_object(rng, main_fine, main_size)
    placed = _place(rng, main, _local_box(main), size, [], tries=1)
    assert placed is not None, "main object does not fit in the image"
    objects = [placed]
    boxes = [placed.box]
    main_area = _area(placed.box)
    for s in other_sizes:
        fine = int(rng.integers(NUM_FINE))
        obj = _sample_object(rng, fine, s)
        local = _local_box(obj)
        while _area(local) >= main_area:  # keep the main object strictly the largest
            s *= 0.85
            obj = _sample_object(rng, fine, s)
            local = _local_box(obj)
        p = _place(rng, obj, local, size, boxes)
        if p is not None:  # no room: drop it
            objects.append(p)
            boxes.append(p.box)

    level = rng.uniform(205.0, 240.0)
    bg = np.clip(np.rint(level + rng.uniform(-10.0, 10.0, 3)), 195, 250).astype(int)
    texture = tuple(
        (float(rng.uniform(1.5, 5.0)), float(rng.uniform(-3, 3)), float(rng.uniform(-3, 3)),
         float(rng.uniform(0, 2 * np.pi)))
        for _ in range(2)
    )
    return Scene(
        size=size,
        kind=split_kind,
        objects=tuple(objects),
        background_rgb=(int(bg[0]), int(bg[1]), int(bg[2])),
        texture=texture,
        noise_std=float(rng.uniform(2.0, 5.0)),
        noise_seed=int(rng.integers(2**62)),
    )


# --- scene graph and detector ----------------------------------------------------------------


def scene_graph(scene: Scene) -> list[tuple[int, str, int]]:
    """(subject, relation, object) triples for every pair i < j, from the box centres.

    The relation is on the axis of the larger centre offset: "left of"/"right of" when
    |dx| >= |dy|, else "above"/"below" (image y grows downwards). Pairs whose centres are closer
    than 1 px on both axes get no relation.
    """
    out = []
    objs = scene.objects
    for i in range(len(objs)):
        yi, xi = objs[i].centre
        for j in range(i + 1, len(objs)):
            yj, xj = objs[j].centre
            dy, dx = yj - yi, xj - xi
            if max(abs(dx), abs(dy)) < 1.0:
                continue
            if abs(dx) >= abs(dy):
                out.append((i, "left of" if dx > 0 else "right of", j))
            else:
                out.append((i, "above" if dy > 0 else "below", j))
    return out


def detector_tags(scene: Scene, rng: np.random.Generator) -> list[Tag]:
    """A simulated object detector's output, sorted by confidence (highest first).

    Per object: the coarse class with confidence in [0.6, 0.99), except with probability
    DETECTOR_WRONG_PROB a wrong coarse class with confidence in [0.15, 0.55); each box edge moves
    by up to DETECTOR_BOX_JITTER px. Per image, with probability DETECTOR_SPURIOUS_PROB one extra
    detection (random box and class) with confidence in [0.05, 0.35).
    """
    s = scene.size
    tags = []
    for index, obj in enumerate(scene.objects):
        if rng.random() < DETECTOR_WRONG_PROB:
            label = int((obj.coarse + rng.integers(1, len(COARSE_NAMES))) % len(COARSE_NAMES))
            conf = rng.uniform(0.15, 0.55)
        else:
            label = obj.coarse
            conf = rng.uniform(0.6, 0.99)
        j = rng.integers(-DETECTOR_BOX_JITTER, DETECTOR_BOX_JITTER + 1, 4)
        y0, x0, y1, x1 = (np.asarray(obj.box) + j).tolist()
        y0, x0 = max(0, y0), max(0, x0)
        y1, x1 = min(s, max(y1, y0 + 4)), min(s, max(x1, x0 + 4))
        tags.append(Tag((float(y0), float(x0), float(y1), float(x1)), COARSE_NAMES[label], float(conf), index))
    if rng.random() < DETECTOR_SPURIOUS_PROB:
        h, w = rng.integers(8, 21, 2)
        y0, x0 = int(rng.integers(0, s - h + 1)), int(rng.integers(0, s - w + 1))
        tags.append(Tag((float(y0), float(x0), float(y0 + h), float(x0 + w)),
                        COARSE_NAMES[int(rng.integers(len(COARSE_NAMES)))], float(rng.uniform(0.05, 0.35))))
    tags.sort(key=lambda t: -t.confidence)
    return tags


def detector_attributes(scene: Scene, tags: list[Tag], rng: np.random.Generator) -> list[str]:
    """The simulated detector's attribute words per tag, as VinVL's attribute head predicts them
    ("red", "striped"): a colour and a pattern adjective, space-separated, possibly empty.

    For a real object: its colour with probability ATTRIBUTE_RIGHT_PROB (else another colour), its
    pattern's adjective with probability ATTRIBUTE_RIGHT_PROB (else another pattern's); each word
    is left out with probability ATTRIBUTE_DROP_PROB. A spurious detection gets random words.
    """
    words = []
    for tag in tags:
        obj = scene.objects[tag.object_index] if tag.object_index >= 0 else None
        colour = obj.colour if obj is not None and rng.random() < ATTRIBUTE_RIGHT_PROB else _pick(rng, COLOURS)
        pattern = obj.pattern if obj is not None and rng.random() < ATTRIBUTE_RIGHT_PROB else _pick(rng, PATTERNS)
        chosen = [w for w in (colour, _pick(rng, PATTERN_ADJECTIVES[pattern])) if rng.random() >= ATTRIBUTE_DROP_PROB]
        words.append(" ".join(chosen))
    return words


# --- captions --------------------------------------------------------------------------------


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _describe(obj: SceneObject, rng: np.random.Generator, name_prob: float) -> str:
    """A visible description of one object (no article); with probability name_prob the fine name
    is added before the coarse noun ("a red dotted zorblat fish")."""
    noun = obj.coarse_name
    if name_prob > 0 and rng.random() < name_prob:
        noun = f"{obj.fine_name} {noun}"
    adj = _pick(rng, PATTERN_ADJECTIVES[obj.pattern])
    form = int(rng.choice(5, p=[0.25, 0.15, 0.3, 0.2, 0.1]))
    if form == 0:
        return f"{obj.colour} {noun}"
    if form == 1:
        return f"{adj} {noun}"
    if obj.pattern == "plain" and form in (2, 3):
        return f"{adj} {obj.colour} {noun}"  # "a plain red car"
    if form == 2:
        return f"{obj.colour} {adj} {noun}"
    if form == 3:
        return f"{obj.colour} {noun} with {_pick(rng, PATTERN_PHRASES[obj.pattern])}"
    return f"{SHAPE_WORDS[obj.shape]} {obj.colour} {noun}"


_REL_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


def web_caption(scene: Scene, rng: np.random.Generator, name_prob: float = DEFAULT_NAME_PROB) -> str:
    """A web-style caption: what is visible (colours, patterns, shapes, classes, counts, relative
    positions). Each object mention names the fine subtype with probability name_prob."""
    objs = scene.objects
    n = len(objs)

    def d(i: int) -> str:
        return _a(_describe(objs[i], rng, name_prob))

    if n == 1:
        t = int(rng.integers(7))
        if t == 6:
            return f"{d(0)} {position_phrase(objs[0], scene.size)}"
        return [
            "{}", "a photo of {}", "a picture of {}", "{} on a light background",
            "there is {} in the picture", "a close-up of {}",
        ][t].format(d(0))

    t = int(rng.integers(4))
    if t == 0:  # relation of the main object to another one
        rels = [r for r in scene_graph(scene) if r[0] == 0]
        if rels:
            _, pred, j = rels[int(rng.integers(len(rels)))]
            cap = f"{d(0)} {_REL_TEXT[pred]} {d(j)}"
            if n >= 3 and rng.random() < 0.5:
                k = next(k for k in range(1, n) if k != j)
                cap += f", and {d(k)}"
            return cap
        t = 1
    if t == 1:  # list
        parts = [d(i) for i in range(n)]
        listed = ", ".join(parts[:-1]) + " and " + parts[-1]
        return _pick(rng, ["{}", "a photo of {}", f"{_NUMBERS[n]} objects: {{}}"]).format(listed)
    if t == 2:  # counts
        coarse = [o.coarse for o in objs]
        counts = {c: coarse.count(c) for c in coarse}
        c_main = objs[0].coarse
        if counts[c_main] >= 2:
            rest = [i for i in range(n) if objs[i].coarse != c_main]
            cap = f"{_NUMBERS[counts[c_main]]} {COARSE_PLURALS[c_main]}"
            if rest:
                cap += f" and {d(rest[0])}"
            return cap
        return f"{_NUMBERS[n]} objects, including {d(0)}"
    return f"{d(0)} next to {d(1)}"


def position_phrase(obj: SceneObject, size: int = 64) -> str:
    """Where the object is, in thirds of the image: "in the top left", "at the bottom", ..."""
    y, x = obj.centre
    v = "top" if y < size / 3 else ("bottom" if y >= 2 * size / 3 else "")
    h = "left" if x < size / 3 else ("right" if x >= 2 * size / 3 else "")
    if v and h:
        return f"in the {v} {h}"
    if v:
        return f"at the {v}"
    if h:
        return f"on the {h}"
    return "in the centre"


def memory_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A memory-style caption: names the main object's fine subtype with its coarse category,
    never how it looks; often also where it is and what is near (those objects described).

    Like the captions of real knowledge sources (an encyclopedia's "Black-footed albatross in
    flight"), a memory caption says *which* subtype it shows, not what the subtype looks like:
    the look is only in the paired image. So an image finds the right memory entries through
    their images (uni-modal search), not through their captions (cross-modal search), as with
    CLIP on real fine-grained data (RECO, Table 5).
    """
    m = scene.main
    name, coarse = m.fine_name, m.coarse_name
    cap = (f"{_a(name)}, a kind of {coarse}", f"a photo of {_a(name)} ({coarse})", f"this {coarse} is {_a(name)}",
           f"{_a(name)}, which is a type of {coarse}", f"the {name}, {_a(coarse)}", f"{_a(name)} {coarse}",
           )[int(rng.integers(6))]
    if rng.random() < 0.4:
        cap += (", " if "," in cap else " ") + position_phrase(m, scene.size)
    if len(scene.objects) > 1 and rng.random() < 0.6:
        rels = [r for r in scene_graph(scene) if r[0] == 0]
        if rels and rng.random() < 0.6:
            _, pred, j = rels[int(rng.integers(len(rels)))]
            cap += f", {_REL_TEXT[pred]} {_a(_describe(scene.objects[j], rng, 0.0))}"
        else:
            j = int(rng.integers(1, len(scene.objects)))
            cap += f", next to {_a(_describe(scene.objects[j], rng, 0.0))}"
    return cap


# --- distractor sentences (about things not in the world) -------------------------------------

_D_SUBJECTS = (
    "the mayor", "my neighbour", "a young chef", "the local team", "our teacher", "the orchestra",
    "a tired student", "the committee", "my grandmother", "the new manager", "a street musician",
    "the city council",
)
_D_PREDICATES = (
    "announced a new budget", "cooked pasta for dinner", "won the final match",
    "missed the morning train", "painted the kitchen wall", "sold the old piano",
    "wrote a long letter", "opened a bakery downtown", "postponed the meeting",
    "planted tomatoes in the garden", "fixed the broken laptop", "read the news aloud",
    "baked bread for the market", "practised the violin", "cancelled the concert",
)
_D_TIMES = ("", " yesterday", " last week", " this morning", " on sunday", " after lunch", " in the evening")
_D_FIXED = (
    "the stock market fell sharply today",
    "interest rates are expected to rise next year",
    "it rained all weekend in the mountains",
    "the coffee was too hot to drink",
    "she finally finished reading that novel",
    "the museum will be closed for renovation",
    "traffic was slow on the highway this morning",
    "the recipe calls for two cups of flour",
    "he forgot his umbrella at the office",
    "the election results will be announced tonight",
    "a quiet library is a good place to study",
    "the match ended in a draw after extra time",
    "prices at the grocery store went up again",
    "the children built a sandcastle on the beach",
    "the software update fixed several bugs",
    "tea tastes better with a little honey",
)


def distractor_sentence(rng: np.random.Generator) -> str:
    """A sentence about something that is not in the world (no class, colour or pattern words)."""
    if rng.random() < 0.4:
        return _pick(rng, _D_FIXED)
    return f"{_pick(rng, _D_SUBJECTS)} {_pick(rng, _D_PREDICATES)}{_pick(rng, _D_TIMES)}"
