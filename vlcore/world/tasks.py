"""The world's four downstream tasks (VQA, NLVR2, VE, RefCOCO+ style), built from scene graphs.

Pure numpy, deterministic from (seed, task, split, index): every image draws from its own
random streams, in a namespace no `vl_world` stream uses, with a different stream per
(task, split), so no image is shared between splits or with `vl_world`. A per-split *plan*
(drawn once from the split's own stream, like `vl_world`'s label plan) fixes what each image is
asked and the wanted answer, balanced per question template; the scene is then constructed to
make the wanted answer true, and the answer written down is recomputed from the finished scene.

How a scene is constructed: a question or statement becomes `requirements` on the scene's
objects (`Count`: how many objects match a `Spec`; `Related`: how many pairs stand in a
relation); `build_scene` proposes objects that meet the count requirements (the fill-up objects
are random), places them as the world places objects, and keeps the first placement whose
scene graph meets the relation requirements too. Objects, placement, rendering and the
simulated detector (tags and attribute words) are the world's own (`vlcore.world.scenes`).

The tasks (templates in each function's docstring):
  vqa      up to 3 questions per image, of different kinds (colour, pattern, count, existence,
           relation), with 10 simulated human answers each, as VQA v2's annotations.
  nlvr2    one statement about a pair of images, True or False (50/50 per template).
  ve       three hypotheses per image, one per label (entailment, neutral, contradiction).
  refcoco  up to 2 referring expressions per image (>= 2 objects), each naming one object with
           the fewest attributes that single it out; testA/testB split the targets by class.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np

from vlcore.world import scenes
from vlcore.world.examples import IMAGE_SIZE, encode_png
from vlcore.world.render import render
from vlcore.world.taxonomy import COARSE_NAMES, COARSE_PLURALS, NUM_FINE, PATTERN_ADJECTIVES, SUBTYPES

TASK_SPLITS: dict[str, tuple[str, ...]] = {
    "vqa": ("train", "val", "test"),
    "nlvr2": ("train", "dev", "test"),
    "ve": ("train", "dev", "test"),
    "refcoco": ("train", "val", "testA", "testB"),
}
TASKS = tuple(TASK_SPLITS)
# Examples per image (at most; NLVR2: one statement per pair of images).
EXAMPLES_PER_IMAGE = {"vqa": 3, "nlvr2": 1, "ve": 3, "refcoco": 2}
VE_LABELS = ("entailment", "neutral", "contradiction")
# RefCOCO+'s testA holds people, testB other objects; here the targets' coarse classes split.
REFCOCO_TEST_CLASSES = {"testA": ("fish", "car", "boat"), "testB": ("kite", "plane", "flower")}
# VQA answers naming a pattern, fixed points of VQA's answer normalisation (the official evaluation
# compares unanimous answers raw: "two-tone" normalises to "2 tone" and would never match).
PATTERN_ANSWERS = {"plain": "plain", "horizontal stripes": "horizontal stripes", "vertical stripes":
                   "vertical stripes", "dots": "dots", "checker": "checkered", "ring": "border", "half": "half dark"}
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
HUMANS = 10  # answers per VQA question, as VQA v2
HUMAN_RIGHT_PROB = 0.9

# The second word of every task stream's seed: the world's streams have a split index (0..4) there.
_NAMESPACE = 0x7A5B
_PLAN, _SCENE, _TAGS, _ATTRIBUTES = 1, 2, 3, 4
_MAX_OBJECTS = 4
_OBJECT_COUNT_PROBS = (0.1, 0.3, 0.3, 0.3)  # of 1..4 objects (fill-up): richer than the web split's
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _stream(seed: int, task: str, split: str, index: int, purpose: int, side: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, _NAMESPACE, TASKS.index(task), TASK_SPLITS[task].index(split),
                                  index, purpose, side])


def _plan_rng(seed: int, task: str, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, _NAMESPACE, TASKS.index(task), TASK_SPLITS[task].index(split), _PLAN])


def _balanced(rng: np.random.Generator, options: Sequence, n: int) -> list:
    """n draws in which every option occurs equally often (to one), in random order."""
    rounds = -(-n // len(options))
    idx = np.concatenate([rng.permutation(len(options)) for _ in range(rounds)])[:n]
    return [options[k] for k in rng.permutation(idx)]


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def palette(coarse: int) -> tuple[str, ...]:
    """The colours objects of a coarse class come in (3 of the 6)."""
    return tuple(dict.fromkeys(s.colour for s in SUBTYPES if s.coarse == coarse))


def patterns_of(coarse: int, colour: str | None = None) -> tuple[str, ...]:
    """The patterns objects of a coarse class (and colour) come in."""
    return tuple(dict.fromkeys(s.pattern for s in SUBTYPES if s.coarse == coarse and colour in (None, s.colour)))


# --- requirements on a scene's objects -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    """Which objects: each of class / colour / pattern fixed (None: any) or excluded (`not_*`)."""

    coarse: int | None = None
    colour: str | None = None
    pattern: str | None = None
    not_coarse: int | None = None
    not_colour: str | None = None
    not_pattern: str | None = None

    def matches(self, o) -> bool:
        """o: anything with .coarse, .colour, .pattern (a SceneObject or a Subtype)."""
        return ((self.coarse is None or o.coarse == self.coarse) and (self.colour is None or o.colour == self.colour)
                and (self.pattern is None or o.pattern == self.pattern) and o.coarse != self.not_coarse
                and o.colour != self.not_colour and o.pattern != self.not_pattern)


@dataclasses.dataclass(frozen=True)
class Count:
    """lo <= (number of objects matching spec) <= hi."""

    spec: Spec
    lo: int
    hi: int


@dataclasses.dataclass(frozen=True)
class Related:
    """lo <= (number of pairs a != b, a matching subject, b matching anchor, with "a `relation` b") <= hi."""

    subject: Spec
    relation: str
    anchor: Spec
    lo: int
    hi: int


def exactly(spec: Spec, n: int) -> Count:
    return Count(spec, n, n)


def some(spec: Spec) -> Count:
    return Count(spec, 1, _MAX_OBJECTS)


def no(spec: Spec) -> Count:
    return Count(spec, 0, 0)


def relations(scene: scenes.Scene) -> dict[tuple[int, int], str]:
    """{(a, b): relation} for every ordered pair with one: "a is left of / right of / above / below b",
    the world's scene graph (`scenes.scene_graph`) and its inverses."""
    out = {}
    for i, rel, j in scenes.scene_graph(scene):
        out[i, j] = rel
        out[j, i] = _INVERSE[rel]
    return out


def count(objects: Sequence, spec: Spec) -> int:
    return sum(spec.matches(o) for o in objects)


def related_pairs(scene: scenes.Scene, subject: Spec, relation: str, anchor: Spec) -> int:
    objs = scene.objects
    return sum(rel == relation and subject.matches(objs[a]) and anchor.matches(objs[b])
               for (a, b), rel in relations(scene).items())


def holds(requirement: Count | Related, scene: scenes.Scene) -> bool:
    if isinstance(requirement, Count):
        n = count(scene.objects, requirement.spec)
    else:
        n = related_pairs(scene, requirement.subject, requirement.relation, requirement.anchor)
    return requirement.lo <= n <= requirement.hi


def _propose(rng: np.random.Generator, requirements: Sequence, total: int) -> list[int] | None:
    """Fine classes of up to 4 objects meeting every Count (None if this draw cannot): for each
    requirement in random order, objects are added until its lower bound is met, never past any
    upper bound; then random objects up to `total`. Related requirements only get their two ends."""
    fines: list[int] = []
    caps = [r for r in requirements if isinstance(r, Count)]

    def add(spec: Spec) -> bool:
        objs = [SUBTYPES[f] for f in fines]
        options = [f for f in range(NUM_FINE) if spec.matches(SUBTYPES[f])
                   and all(count(objs, c.spec) + c.spec.matches(SUBTYPES[f]) <= c.hi for c in caps)]
        if len(fines) >= _MAX_OBJECTS or not options:
            return False
        fines.append(_pick(rng, options))
        return True

    def has_pair(subject: Spec, anchor: Spec) -> bool:
        objs = [SUBTYPES[f] for f in fines]
        return any(subject.matches(a) and anchor.matches(b) for a, b in itertools.permutations(objs, 2))

    for k in rng.permutation(len(requirements)):
        r = requirements[k]
        if isinstance(r, Count):
            while count([SUBTYPES[f] for f in fines], r.spec) < r.lo:
                if not add(r.spec):
                    return None
        elif r.lo > 0 and not has_pair(r.subject, r.anchor):
            if not count([SUBTYPES[f] for f in fines], r.anchor) and not add(r.anchor):
                return None
            if not has_pair(r.subject, r.anchor) and not add(r.subject):
                return None
    while len(fines) < total and add(Spec()):
        pass
    objs = [SUBTYPES[f] for f in fines]
    if not fines or not all(c.lo <= count(objs, c.spec) <= c.hi for c in caps):
        return None
    return fines


def _sample_objects(rng: np.random.Generator, fines: Sequence[int], size: int) -> list:
    """(object, local box) per fine class, sized as the world sizes a scene's objects (14-30 px, the
    first strictly the largest: the main object)."""
    sizes = np.sort(rng.uniform(14.0, 30.0, len(fines)) * size / 64.0)[::-1]
    out = []
    for k, (fine, s) in enumerate(zip(fines, sizes)):
        obj = scenes._sample_object(rng, fine, float(s))
        local = scenes._local_box(obj)
        while k and _area(local) >= _area(out[0][1]):
            s *= 0.85
            obj = scenes._sample_object(rng, fine, float(s))
            local = scenes._local_box(obj)
        out.append((obj, local))
    return out


def _area(box: tuple[int, int, int, int]) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def _place_all(rng: np.random.Generator, sampled: list, size: int) -> tuple[scenes.SceneObject, ...] | None:
    placed: list[scenes.SceneObject] = []
    for k, (obj, local) in enumerate(sampled):
        p = scenes._place(rng, obj, local, size, [o.box for o in placed], tries=1 if k == 0 else 40)
        if p is None:
            return None
        placed.append(p)
    return tuple(placed)


def build_scene(rng: np.random.Generator, requirements: Sequence, proposals: int = 30, placements: int = 12,
                size: int = IMAGE_SIZE, count_probs: Sequence[float] = _OBJECT_COUNT_PROBS) -> scenes.Scene | None:
    """A "web" scene of the world meeting every requirement, or None when none was found.

    The background, texture and noise are a world scene's (its own object is replaced)."""
    blank = scenes.sample_scene(rng, "web", n_objects=1, size=size)
    for _ in range(proposals):
        fines = _propose(rng, requirements, int(rng.choice(len(count_probs), p=count_probs)) + 1)
        if fines is None:
            continue
        sampled = _sample_objects(rng, [fines[k] for k in rng.permutation(len(fines))], size)
        for _ in range(placements):
            objects = _place_all(rng, sampled, size)
            if objects is None:
                continue
            scene = dataclasses.replace(blank, objects=objects)
            if all(holds(r, scene) for r in requirements):
                return scene
    return None


# --- one image as the datasets store it --------------------------------------------------------------


def image_record(key: str, scene: scenes.Scene, tag_rng: np.random.Generator,
                 attribute_rng: np.random.Generator) -> dict:
    """The image block of an example: image_id (the key), PNG bytes, the true objects and the
    simulated detector's tags with attribute words, as `vl_world` makes them; boxes are
    (ymin, xmin, ymax, xmax) / image size."""
    tags = scenes.detector_tags(scene, tag_rng)
    attributes = scenes.detector_attributes(scene, tags, attribute_rng)
    s = float(scene.size)
    return {
        "image_id": key,
        "image": encode_png(render(scene, scene.size)),
        "objects": {
            "bbox": np.asarray([o.box for o in scene.objects], np.float32).reshape(-1, 4) / s,
            "label": [o.coarse_name for o in scene.objects],
            "colour": [o.colour for o in scene.objects],
            "pattern": [o.pattern for o in scene.objects],
        },
        "tags": {
            "bbox": np.asarray([t.box for t in tags], np.float32).reshape(-1, 4) / s,
            "label": [t.label for t in tags],
            "confidence": np.asarray([t.confidence for t in tags], np.float32),
            "attributes": attributes,
        },
    }


def _image(seed: int, task: str, split: str, index: int, key: str, scene: scenes.Scene, side: int = 0) -> dict:
    return image_record(key, scene, _stream(seed, task, split, index, _TAGS, side),
                        _stream(seed, task, split, index, _ATTRIBUTES, side))


def _a(phrase: str) -> str:
    return scenes._a(phrase)  # "a red fish", "an orange kite"


def _adjective(rng: np.random.Generator, pattern: str) -> str:
    return _pick(rng, PATTERN_ADJECTIVES[pattern])


# --- VQA ---------------------------------------------------------------------------------------------

VQA_KINDS = ("colour", "pattern", "count", "exist", "relation")
VQA_QUESTION_TYPES = {"colour": "what color is the", "pattern": "what pattern", "count": "how many",
                      "exist": "is there a", "relation": "what is"}
VQA_ANSWER_TYPES = {"colour": "other", "pattern": "other", "count": "number", "exist": "yes/no", "relation": "other"}


def _vqa_wants(kind: str) -> list[tuple]:
    """Every (parameters..., answer) a question of this kind can have; the plan draws them equally
    often, so no question's words predict its answer. Colours and patterns are only those the class
    comes in ("what colour is the fish" is never "blue": no fish is)."""
    classes = range(len(COARSE_NAMES))
    if kind == "colour":  # (class, answer colour)
        return [(c, a) for c in classes for a in palette(c)]
    if kind == "pattern":  # (class, colour, answer pattern): only colours the class has in two patterns
        return [(c, a, p) for c in classes for a in palette(c) if len(patterns_of(c, a)) == 2
                for p in patterns_of(c, a)]
    if kind == "count":  # (class, answer count)
        return [(c, n) for c in classes for n in range(_MAX_OBJECTS + 1)]
    if kind == "exist":  # (class, colour, answer yes)
        return [(c, a, yes) for c in classes for a in palette(c) for yes in (True, False)]
    # relation: (class, colour, relation, answer class)
    return [(c, a, r, d) for c in classes for a in palette(c) for r in RELATION_PHRASES for d in classes]


def vqa_plan(seed: int, split: str, n_questions: int) -> list[tuple[tuple, ...]]:
    """The questions of each image: (kind, want) pairs, at most 3 per image, of different kinds and
    about different classes, needing at most 4 objects together.

    Every kind gets n/5 questions and each kind's wants are balanced (`_vqa_wants`); they are
    packed into images first-fit, the most demanding first (a count of 4 fish fills an image), so
    none is dropped for want of room and the answers stay balanced.
    """
    rng = _plan_rng(seed, "vqa", split)
    per_kind = Counter(_balanced(rng, VQA_KINDS, n_questions))
    wants = [(kind, w) for kind in VQA_KINDS for w in _balanced(rng, _vqa_wants(kind), per_kind[kind])]
    wants = [wants[k] for k in rng.permutation(len(wants))]
    wants.sort(key=lambda kw: -_objects_needed(kw[0], kw[1]))
    images: list[list[tuple]] = []
    open_images: list[tuple[list, set, set, list]] = []  # (wants, kinds, classes, [objects needed])
    for kind, want in wants:
        need, classes = _objects_needed(kind, want), _classes_asked(kind, want)
        for slot in open_images:
            if kind not in slot[1] and not classes & slot[2] and slot[3][0] + need <= _MAX_OBJECTS:
                break
        else:
            slot = ([], set(), set(), [0])
            open_images.append(slot)
            images.append(slot[0])
        slot[0].append((kind, want))
        slot[1].add(kind)
        slot[2].update(classes)
        slot[3][0] += need
        if len(slot[0]) == 3 or slot[3][0] == _MAX_OBJECTS:
            open_images.remove(slot)
    return [tuple(images[k]) for k in rng.permutation(len(images))]


def _objects_needed(kind: str, want: tuple) -> int:
    """Objects a question's scene must have (beyond any of another class)."""
    if kind == "count":
        return want[1]
    if kind == "relation" or (kind == "exist" and not want[2]):
        return 2
    return 1


def _classes_asked(kind: str, want: tuple) -> set[int]:
    return {want[0], want[3]} if kind == "relation" else {want[0]}


def _vqa_requirements(kind: str, want: tuple, rng: np.random.Generator) -> list:
    if kind == "colour":  # the class is unique in the scene
        c, a = want
        return [exactly(Spec(c), 1), some(Spec(c, a))]
    if kind == "pattern":  # the (colour, class) is unique
        c, a, p = want
        return [exactly(Spec(c, a), 1), some(Spec(c, a, p))]
    if kind == "count":
        c, n = want
        return [exactly(Spec(c), n)]
    if kind == "exist":
        c, a, yes = want
        if yes:
            return [some(Spec(c, a))]
        # negatives are mostly compositional: the class and the colour both there, not together
        mode = rng.choice(3, p=[0.7, 0.15, 0.15])
        return [no(Spec(c, a))] + [some(Spec(c, not_colour=a))] * (mode != 2) \
            + [some(Spec(colour=a, not_coarse=c))] * (mode != 1)
    c, a, r, d = want  # "what is <r> the <a> <c>?": exactly one object is, of class d
    return [exactly(Spec(c, a), 1), Related(Spec(), r, Spec(c, a), 1, 1), Related(Spec(d), r, Spec(c, a), 1, 1)]


def vqa_answer(kind: str, want: tuple, scene: scenes.Scene) -> str | None:
    """The true answer of the question `want` asks about the scene, None if it has none."""
    objs = scene.objects
    if kind == "count":
        return str(count(objs, Spec(want[0])))
    if kind == "exist":
        return "yes" if count(objs, Spec(want[0], want[1])) else "no"
    subject = Spec(want[0]) if kind == "colour" else Spec(want[0], want[1])
    matching = [i for i, o in enumerate(objs) if subject.matches(o)]
    if len(matching) != 1:
        return None
    x = matching[0]
    if kind == "colour":
        return objs[x].colour
    if kind == "pattern":
        return PATTERN_ANSWERS[objs[x].pattern]
    rel = relations(scene)
    ys = [a for a in range(len(objs)) if rel.get((a, x)) == want[2]]
    return objs[ys[0]].coarse_name if len(ys) == 1 else None


def _vqa_text(kind: str, want: tuple, rng: np.random.Generator) -> str:
    c = COARSE_NAMES[want[0]]
    if kind == "colour":
        return f"what {_pick(rng, ('colour', 'color'))} is the {c}?"
    if kind == "pattern":
        return f"what pattern does the {want[1]} {c} have?"
    if kind == "count":
        return f"how many {COARSE_PLURALS[want[0]]} are there?"
    if kind == "exist":
        return f"is there {_a(f'{want[1]} {c}')}?"
    return f"what is {RELATION_PHRASES[want[2]]} the {want[1]} {c}?"


def human_answers(rng: np.random.Generator, kind: str, want: tuple, answer: str) -> list[str]:
    """10 annotators: the true answer with p = 0.9, else a near miss (another colour of the class,
    the count +-1, the other of yes/no, another pattern of the class, another class). At most 4 miss,
    so the most common answer is the true one (more than 4 of 10 at p = 0.1 happens 0.16 % of the time)."""
    wrong = min(int(rng.binomial(HUMANS, 1.0 - HUMAN_RIGHT_PROB)), 4)
    c = want[0]
    if kind == "colour":
        misses = [a for a in palette(c) if a != answer]
    elif kind == "pattern":
        misses = [PATTERN_ANSWERS[p] for p in patterns_of(c) if PATTERN_ANSWERS[p] != answer]
    elif kind == "count":
        misses = [str(n) for n in (int(answer) - 1, int(answer) + 1) if 0 <= n <= _MAX_OBJECTS]
    elif kind == "exist":
        misses = ["no" if answer == "yes" else "yes"]
    else:
        misses = [name for name in COARSE_NAMES if name != answer]
    out = [answer] * HUMANS
    for k in rng.choice(HUMANS, wrong, replace=False):
        out[int(k)] = _pick(rng, misses)
    return out


def most_common_answer(answers: Sequence[str]) -> str:
    """VQA's multiple_choice_answer: the most common answer (ties: alphabetical first)."""
    counts = Counter(answers)
    return min(counts, key=lambda a: (-counts[a], a))


def vqa_examples(seed: int, split: str, index: int, wants: tuple[tuple, ...]) -> list[dict]:
    """The questions of image `index`: all planned ones if a scene carrying them is found (nearly
    always), else, most demanding first, each that can still join."""
    rng = _stream(seed, "vqa", split, index, _SCENE)
    texts = [_vqa_text(kind, want, rng) for kind, want in wants]
    reqs = [_vqa_requirements(kind, want, rng) for kind, want in wants]
    asked = list(range(len(wants)))
    scene = build_scene(rng, [r for k in asked for r in reqs[k]])
    if scene is None:
        asked = []
        for k in sorted(range(len(wants)), key=lambda k: -_objects_needed(*wants[k])):
            candidate = build_scene(rng, [r for j in asked + [k] for r in reqs[j]])
            if candidate is not None:
                scene, asked = candidate, sorted(asked + [k])
    if scene is None:
        raise RuntimeError(f"vqa {split} image {index}: no scene for any of {wants}")
    key = f"vqa-{split}-{index:06d}"
    image = _image(seed, "vqa", split, index, key, scene)
    out = []
    for k in asked:
        kind, want = wants[k]
        answer = vqa_answer(kind, want, scene)
        if answer != _planned_vqa_answer(kind, want):
            raise RuntimeError(f"vqa {split} image {index}: {texts[k]!r} has answer {answer!r}, planned otherwise")
        humans = human_answers(rng, kind, want, answer)
        out.append({
            "question_id": TASK_SPLITS["vqa"].index(split) * 100_000_000 + index * 10 + k,
            "question": texts[k], "question_type": VQA_QUESTION_TYPES[kind], "answer_type": VQA_ANSWER_TYPES[kind],
            "answers": humans, "multiple_choice_answer": most_common_answer(humans), **image,
        })
    return out


def _planned_vqa_answer(kind: str, want: tuple) -> str:
    last = want[-1]
    if kind == "pattern":
        return PATTERN_ANSWERS[last]
    if kind == "exist":
        return "yes" if last else "no"
    if kind == "relation":
        return COARSE_NAMES[last]
    return str(last)


# --- NLVR2 -------------------------------------------------------------------------------------------

NLVR2_TEMPLATES = ("both", "exactly_one", "more", "total", "pattern_only_left", "relation")


def nlvr2_plan(seed: int, split: str, n_pairs: int) -> list[tuple[str, bool]]:
    """(template, label) per pair: templates balanced, and True/False balanced within each."""
    rng = _plan_rng(seed, "nlvr2", split)
    return _balanced(rng, [(t, label) for t in NLVR2_TEMPLATES for label in (True, False)], n_pairs)


def _nlvr2_params(template: str, rng: np.random.Generator) -> tuple:
    c = int(rng.integers(len(COARSE_NAMES)))
    if template == "both":
        return c, _pick(rng, palette(c))
    if template in ("exactly_one", "more"):
        return (c,)
    if template == "total":
        return c, int(rng.integers(2, 6))
    if template == "pattern_only_left":
        p = _pick(rng, patterns_of(c))
        return c, p, _adjective(rng, p)
    others = [d for d in range(len(COARSE_NAMES)) if d != c]
    side, relation = _pick(rng, ("left", "right")), _pick(rng, tuple(RELATION_PHRASES))
    return side, c, _pick(rng, palette(c)), relation, _pick(rng, others)


def nlvr2_sentence(template: str, params: tuple) -> str:
    c = COARSE_NAMES[params[0 if template != "relation" else 1]]
    if template == "both":
        return f"both images contain {_a(f'{params[1]} {c}')}"
    if template == "exactly_one":
        return f"exactly one image contains {_a(c)}"
    if template == "more":
        return f"the left image has more {COARSE_PLURALS[params[0]]} than the right image"
    if template == "total":
        return f"there are exactly {NUMBER_WORDS[params[1]]} {COARSE_PLURALS[params[0]]} in the two images together"
    if template == "pattern_only_left":
        return f"the left image contains {_a(f'{params[2]} {c}')} and the right image does not"
    side, _, a, r, d = params
    return f"in the {side} image {_a(f'{a} {c}')} is {RELATION_PHRASES[r]} {_a(COARSE_NAMES[d])}"


def nlvr2_truth(template: str, params: tuple, left: scenes.Scene, right: scenes.Scene) -> bool:
    """Whether the statement holds of the pair (recomputed from the scenes' objects and graphs)."""
    if template == "relation":
        side, c, a, r, d = params
        return related_pairs(left if side == "left" else right, Spec(c, a), r, Spec(d)) > 0
    c = params[0]
    n_left, n_right = count(left.objects, Spec(c)), count(right.objects, Spec(c))
    if template == "both":
        return count(left.objects, Spec(c, params[1])) > 0 and count(right.objects, Spec(c, params[1])) > 0
    if template == "exactly_one":
        return (n_left > 0) != (n_right > 0)
    if template == "more":
        return n_left > n_right
    if template == "total":
        return n_left + n_right == params[1]
    return count(left.objects, Spec(c, pattern=params[1])) > 0 and count(right.objects, Spec(c, pattern=params[1])) == 0


def _near_miss(rng: np.random.Generator, spec: Spec) -> list:
    """Requirements of an image without a (colour, class) or (pattern, class) object that has the
    class, or the colour on another class, or both: a miss only the binding tells."""
    options = [[some(dataclasses.replace(spec, colour=None, pattern=None, not_colour=spec.colour,
                                         not_pattern=spec.pattern))]]
    if spec.colour is not None:
        options.append([some(Spec(colour=spec.colour, not_coarse=spec.coarse))])
        options.append(options[0] + options[1])
    return [no(spec)] + _pick(rng, options)


def _nlvr2_requirements(template: str, params: tuple, label: bool, rng: np.random.Generator) -> tuple[list, list]:
    """(left, right) requirements that make the statement `label`; among the ways, a random one."""
    if template == "relation":
        side, c, a, r, d = params
        holds_ = [Related(Spec(c, a), r, Spec(d), 1, _MAX_OBJECTS)]
        fails = [some(Spec(c, a)), some(Spec(d)), Related(Spec(c, a), r, Spec(d), 0, 0)]
        mine, other = (holds_, []) if label else (fails, holds_ if rng.random() < 0.5 else [])
        return (mine, other) if side == "left" else (other, mine)
    c = params[0]
    if template in ("both", "pattern_only_left"):
        spec = Spec(c, params[1]) if template == "both" else Spec(c, pattern=params[1])
        yes, miss = [some(spec)], _near_miss(rng, spec)
        if template == "both":
            return (yes, yes) if label else _pick(rng, [(miss, yes), (yes, miss), (miss, _near_miss(rng, spec))])
        return (yes, miss) if label else _pick(rng, [(miss, yes), (miss, _near_miss(rng, spec)), (yes, yes)])
    if template == "exactly_one":
        has, hasnt = [some(Spec(c))], [no(Spec(c))]
        return _pick(rng, [(has, hasnt), (hasnt, has)] if label else [(has, has), (hasnt, hasnt)])
    if template == "more":
        pairs = [(m, n) for m in range(_MAX_OBJECTS + 1) for n in range(_MAX_OBJECTS + 1) if (m > n) == label]
    else:
        n = params[1]
        totals = [n] if label else [m for m in (n - 2, n - 1, n + 1, n + 2) if 0 <= m <= 2 * _MAX_OBJECTS]
        total = _pick(rng, totals)
        pairs = [(m, total - m) for m in range(_MAX_OBJECTS + 1) if 0 <= total - m <= _MAX_OBJECTS]
    m, n = _pick(rng, pairs)
    return [exactly(Spec(c), m)], [exactly(Spec(c), n)]


def nlvr2_examples(seed: int, split: str, index: int, template: str, label: bool) -> list[dict]:
    """One statement about a new pair of images, true or false as planned: the parameters are
    drawn first, then two scenes that make the statement so (new parameters if none is found)."""
    rng = _stream(seed, "nlvr2", split, index, _SCENE)
    for _ in range(20):
        params = _nlvr2_params(template, rng)
        left_reqs, right_reqs = _nlvr2_requirements(template, params, label, rng)
        left, right = build_scene(rng, left_reqs), build_scene(rng, right_reqs)
        if left is not None and right is not None:
            break
    else:
        raise RuntimeError(f"nlvr2 {split} pair {index}: no scenes for {template} = {label}")
    if nlvr2_truth(template, params, left, right) != label:
        raise RuntimeError(f"nlvr2 {split} pair {index}: {template} {params} is not {label}")
    stem = f"{split}-{index}-0"
    return [{
        "identifier": f"{stem}-0", "sentence": nlvr2_sentence(template, params), "label": label,
        "left": _image(seed, "nlvr2", split, index, f"{stem}-img0", left, side=0),
        "right": _image(seed, "nlvr2", split, index, f"{stem}-img1", right, side=1),
    }]


# --- VE ----------------------------------------------------------------------------------------------

VE_KINDS = ("colour", "pattern", "count", "relation")
# Unverifiable clauses (singular, plural): nothing in an image says whether they hold.
UNVERIFIABLE_CLAUSES = (
    ("is waiting for its owner", "are waiting for their owner"),
    ("belongs to my neighbour", "belong to my neighbour"),
    ("was bought last week", "were bought last week"),
    ("is for sale", "are for sale"),
    ("was made in italy", "were made in italy"),
    ("is brand new", "are brand new"),
    ("is a birthday present", "are birthday presents"),
    ("is owned by a famous actor", "are owned by a famous actor"),
)
CONTRADICTION_CLAUSE_PROB = 0.5


def ve_plan(seed: int, split: str, n_images: int) -> list[tuple[tuple[str, str], ...]]:
    """Per image the three (label, kind) in a random order; each label's kinds balanced."""
    rng = _plan_rng(seed, "ve", split)
    kinds = {label: _balanced(rng, VE_KINDS, n_images) for label in VE_LABELS}
    return [tuple((label, kinds[label][i]) for label in (VE_LABELS[k] for k in rng.permutation(3)))
            for i in range(n_images)]


def _ve_params(kind: str, rng: np.random.Generator) -> tuple:
    c = int(rng.integers(len(COARSE_NAMES)))
    if kind == "colour":
        return c, _pick(rng, palette(c))
    if kind == "pattern":
        p = _pick(rng, patterns_of(c))
        return c, p, _adjective(rng, p)
    if kind == "count":
        return c, int(rng.integers(1, 4))
    return c, _pick(rng, palette(c)), _pick(rng, tuple(RELATION_PHRASES)), \
        _pick(rng, [d for d in range(len(COARSE_NAMES)) if d != c])


def _ve_requirements(kind: str, params: tuple, true: bool, rng: np.random.Generator) -> list:
    """Requirements making the statement true, or false by one changed colour / pattern / count /
    relation / class (the rest of what it says is in the image)."""
    c = params[0]
    if kind == "colour":
        spec = Spec(c, params[1])
        return [some(spec)] if true else _near_miss(rng, spec)
    if kind == "pattern":
        spec = Spec(c, pattern=params[1])
        return [some(spec)] if true else _near_miss(rng, spec)
    if kind == "count":
        n = params[1] if true else _pick(rng, (params[1] - 1, params[1] + 1))
        return [exactly(Spec(c), n)]
    _, a, r, d = params
    if true:
        return [Related(Spec(c, a), r, Spec(d), 1, _MAX_OBJECTS)]
    return [some(Spec(c, a)), some(Spec(d)), Related(Spec(c, a), r, Spec(d), 0, 0)]


def ve_statement_holds(kind: str, params: tuple, scene: scenes.Scene) -> bool:
    c = params[0]
    if kind == "colour":
        return count(scene.objects, Spec(c, params[1])) > 0
    if kind == "pattern":
        return count(scene.objects, Spec(c, pattern=params[1])) > 0
    if kind == "count":
        return count(scene.objects, Spec(c)) == params[1]
    return related_pairs(scene, Spec(c, params[1]), params[2], Spec(params[3])) > 0


def ve_hypothesis(kind: str, params: tuple, clause: tuple[str, str] | None) -> str:
    """"there is a red fish" / "a red fish is waiting for its owner" (the statement plus an
    unverifiable clause), and likewise for the other kinds."""
    c = COARSE_NAMES[params[0]]
    if kind == "count":
        n = params[1]
        noun = c if n == 1 else COARSE_PLURALS[params[0]]
        if clause:
            return f"exactly {NUMBER_WORDS[n]} {noun} {clause[n != 1]}"
        return f"there {'is' if n == 1 else 'are'} exactly {NUMBER_WORDS[n]} {noun}"
    if kind == "relation":
        _, a, r, d = params
        subject, rel, anchor = _a(f"{a} {c}"), RELATION_PHRASES[r], _a(COARSE_NAMES[d])
        return f"{subject} {rel} {anchor} {clause[0]}" if clause else f"{subject} is {rel} {anchor}"
    phrase = _a(f"{params[1] if kind == 'colour' else params[2]} {c}")
    return f"{phrase} {clause[0]}" if clause else f"there is {phrase}"


def ve_examples(seed: int, split: str, index: int, planned: tuple[tuple[str, str], ...]) -> list[dict]:
    """The three hypotheses of image `index` (entailment and neutral true of it, contradiction
    false); new parameters (same labels and kinds) while no scene makes them so."""
    rng = _stream(seed, "ve", split, index, _SCENE)
    for _ in range(40):
        params = [_ve_params(kind, rng) for _, kind in planned]
        reqs = [r for (label, kind), p in zip(planned, params)
                for r in _ve_requirements(kind, p, label != "contradiction", rng)]
        scene = build_scene(rng, reqs)
        if scene is not None:
            break
    else:
        raise RuntimeError(f"ve {split} image {index}: no scene for {planned}")
    key = f"ve-{split}-{index:06d}"
    image = _image(seed, "ve", split, index, key, scene)
    out = []
    for k, ((label, kind), p) in enumerate(zip(planned, params)):
        if ve_statement_holds(kind, p, scene) != (label != "contradiction"):
            raise RuntimeError(f"ve {split} image {index}: {kind} {p} does not fit {label}")
        with_clause = label == "neutral" or (label == "contradiction" and rng.random() < CONTRADICTION_CLAUSE_PROB)
        clause = _pick(rng, UNVERIFIABLE_CLAUSES) if with_clause else None
        out.append({"pair_id": f"{key}#{k}", "hypothesis": ve_hypothesis(kind, p, clause), "gold_label": label,
                    **image})
    return out


# --- RefCOCO+ ----------------------------------------------------------------------------------------

REFS_PER_IMAGE = 2
_SAME_CLASS_PROBS = (0.2, 0.55, 0.25)  # objects of the first target's class: 1, 2, 3 (RefCOCO+: distractors)


def refcoco_classes(split: str) -> tuple[int, ...]:
    """The coarse classes a split's targets have: testA fish/car/boat, testB kite/plane/flower, else all."""
    names = REFCOCO_TEST_CLASSES.get(split, COARSE_NAMES)
    return tuple(COARSE_NAMES.index(n) for n in names)


def refcoco_plan(seed: int, split: str, n_images: int) -> list[tuple[int, int]]:
    """(first target's class, objects of that class) per image; classes balanced."""
    rng = _plan_rng(seed, "refcoco", split)
    classes = _balanced(rng, refcoco_classes(split), n_images)
    same = rng.choice(len(_SAME_CLASS_PROBS), n_images, p=_SAME_CLASS_PROBS) + 1
    return [(int(c), int(n)) for c, n in zip(classes, same)]


def _describe(scene: scenes.Scene, t: int, rng: np.random.Generator) -> str | None:
    """The shortest attribute description singling out object t ("the fish", "the red fish", "the
    dotted fish", "the red dotted fish"; colour or pattern at random when either does), or None."""
    objs, o = scene.objects, scene.objects[t]
    c = o.coarse_name

    def unique(spec: Spec) -> bool:
        return [k for k, x in enumerate(objs) if spec.matches(x)] == [t]

    if unique(Spec(o.coarse)):
        return f"the {c}"
    options = [f"the {o.colour} {c}"] * unique(Spec(o.coarse, o.colour)) \
        + [f"the {_adjective(rng, o.pattern)} {c}"] * unique(Spec(o.coarse, pattern=o.pattern))
    if options:
        return _pick(rng, options)
    if unique(Spec(o.coarse, o.colour, o.pattern)):
        return f"the {o.colour} {_adjective(rng, o.pattern)} {c}"
    return None


def referring_expression(scene: scenes.Scene, t: int, rng: np.random.Generator) -> str | None:
    """The expression for object t: its shortest attribute description, else "the {class} {relation}
    {anchor}" where the target is the only object of its class in that relation to an anchor
    object that has a description of its own; None if neither singles it out."""
    described = _describe(scene, t, rng)
    if described is not None:
        return described
    objs, rel = scene.objects, relations(scene)
    for j in rng.permutation(len(objs)):
        r = rel.get((t, int(j)))
        if r is None:
            continue
        same = [k for k, x in enumerate(objs) if x.coarse == objs[t].coarse and rel.get((k, int(j))) == r]
        anchor = _describe(scene, int(j), rng)
        if same == [t] and anchor is not None:
            return f"the {objs[t].coarse_name} {RELATION_PHRASES[r]} {anchor}"
    return None


def refcoco_examples(seed: int, split: str, index: int, first_class: int, same_class: int) -> list[dict]:
    """Up to 2 referring expressions in image `index` (>= 2 objects, `same_class` of them of
    `first_class`): targets of the split's classes, preferring same-class ones."""
    rng = _stream(seed, "refcoco", split, index, _SCENE)
    scene = build_scene(rng, [exactly(Spec(first_class), same_class), Count(Spec(), 2, _MAX_OBJECTS)],
                        count_probs=(0.0, 0.3, 0.35, 0.35))
    if scene is None:
        raise RuntimeError(f"refcoco {split} image {index}: no scene with {same_class} x {first_class}")
    allowed = refcoco_classes(split)
    objs = scene.objects
    first = [k for k, o in enumerate(objs) if o.coarse == first_class]
    rest = [k for k, o in enumerate(objs) if o.coarse in allowed and o.coarse != first_class]
    candidates = list(rng.permutation(first)) + list(rng.permutation(rest))
    key = f"refcoco-{split}-{index:06d}"
    image = None
    out = []
    for t in candidates:
        t = int(t)
        sentence = referring_expression(scene, t, rng)
        if sentence is None:
            continue
        image = image or _image(seed, "refcoco", split, index, key, scene)
        ref_id = TASK_SPLITS["refcoco"].index(split) * 100_000_000 + index * 10 + len(out)
        out.append({"ref_id": ref_id, "sent_id": ref_id, "sentence": sentence, "category": objs[t].coarse_name,
                    "bbox": np.asarray(objs[t].box, np.float32) / float(scene.size), **image})
        if len(out) == REFS_PER_IMAGE:
            break
    return out


# --- a split --------------------------------------------------------------------------------------------


def split_examples(seed: int, task: str, split: str, n_examples: int) -> Iterator[tuple[str, dict]]:
    """Yields (key, example) of a split, image by image: about n_examples of them (VQA: n planned
    questions; NLVR2: n pairs; VE: n/3 images of 3 hypotheses; RefCOCO+: n/2 images of up to 2
    expressions, a few fewer where no second object can be singled out).

    key: the example's id as a string (question_id, identifier, pair_id, sent_id), unique in the split.
    """
    if task not in TASK_SPLITS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if split not in TASK_SPLITS[task]:
        raise ValueError(f"{task} has splits {TASK_SPLITS[task]}, not {split!r}")
    n_images = -(-n_examples // EXAMPLES_PER_IMAGE[task])
    if task == "vqa":
        for i, wants in enumerate(vqa_plan(seed, split, n_examples)):
            for ex in vqa_examples(seed, split, i, wants):
                yield str(ex["question_id"]), ex
    elif task == "nlvr2":
        for i, (template, label) in enumerate(nlvr2_plan(seed, split, n_images)):
            for ex in nlvr2_examples(seed, split, i, template, label):
                yield ex["identifier"], ex
    elif task == "ve":
        for i, planned in enumerate(ve_plan(seed, split, n_images)):
            for ex in ve_examples(seed, split, i, planned):
                yield ex["pair_id"], ex
    else:
        for i, (first_class, same_class) in enumerate(refcoco_plan(seed, split, n_images)):
            for ex in refcoco_examples(seed, split, i, first_class, same_class):
                yield str(ex["sent_id"]), ex
