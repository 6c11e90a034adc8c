"""A procedural vision-language world: the default data of RECO and mu-VLA, made here.

Real image-text data cannot be downloaded, so the default job runs on this world: a TFDS dataset
(`vl_world`, see `vlcore.world.builder`) generated deterministically from a seed in about a
minute on 2 cores (the quick config), read through `tfds.load` like a real dataset.

What is in it
-------------
64x64 RGB images with 1-4 objects (14-30 px, boxed) on a light, mildly textured background.
Six coarse categories with ordinary names and distinct silhouettes (fish: ellipse, car:
rectangle, boat: triangle, kite: diamond, plane: cross, flower: star); each has 5 fine-grained
subtypes (30 in all) that share the silhouette and differ only in a fill pattern + colour
(plain, stripes, dots, checker, border, half-split; red, blue, green, yellow, purple, orange),
with per-instance jitter (size, aspect, rotation, colour). The subtypes carry opaque proper
names ("zorblat", "quenvik", ...) that say nothing about their look (`vlcore.world.taxonomy`).

Why: RECO's situation
---------------------
RECO keeps a frozen CLIP-like two-tower model and adds an external memory of image-text pairs:
image->image kNN search fetches the caption embeddings of the matched pairs, text->text search
fetches their image embeddings, and a small fusion transformer refines the query embedding.
That pays off when the frozen model lacks knowledge that the memory holds. The world recreates
that gap on purpose:

- `web` captions (to pre-train the frozen model) describe what is visible - colours, patterns,
  shapes, coarse categories, counts, relative positions - and name the fine subtype only rarely
  (~3 % of object mentions). The frozen model learns coarse categories and attributes, but
  barely the 30 names: zero-shot fine-grained classification by name is hard for it.
- `memory` captions name the main object's fine subtype with its coarse category but never how it
  looks ("a zorblat, a kind of fish, in the top left, next to a red car"), as an encyclopedia's
  captions do: the look is only in the paired image, so retrieval brings the names in.
  `fusion_train` (to train the fusion module; 18 of the 30 subtypes) and `test` (held out; main
  object dominant, with fine/coarse labels; balanced classes) use the same style.

For mu-VLA (weakly supervised pre-training from unpaired images and text) every image also has
its objects (box, classes, colour, pattern), a scene graph of pairwise spatial relations, and
the tags of a simulated noisy detector; the `text_corpus` split holds unpaired sentences:
web-style captions of other scenes plus ~30 % distractor sentences about things not in the world.

Modules: `taxonomy` (classes, attributes, zero-shot prompts), `scenes` (sampling, scene graph,
detector, captions), `render` (numpy drawing), `examples` (per-example seeding, parallel
generation), `builder` (the TFDS builder; importing it registers `vl_world`), `show` (a PNG
grid of examples). Only `builder` and `show` import TensorFlow.
"""

from vlcore.world.taxonomy import (  # noqa: F401
    CLASSIFICATION_TEMPLATES,
    COARSE_NAMES,
    FINE_NAMES,
    SUBTYPES,
    class_prompts,
    coarse_names,
    fine_names,
    fine_to_coarse,
)
