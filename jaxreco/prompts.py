"""Zero-shot class prompts: class names from the TFDS metadata, prompt templates as CLIP's.

Each prompt set maps a classification dataset to one list of prompts per class (label order):
the class names come from the dataset's `ClassLabel` feature (so real datasets and the world
are read the same way), the templates from CLIP's zero-shot evaluation
(openai/CLIP, notebooks/Prompt_Engineering_for_ImageNet.ipynb and data/prompts.md).
"""

from __future__ import annotations

import re
from typing import Any

# CLIP's templates per dataset (data/prompts.md in openai/CLIP).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "cars196": (
        "a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
        "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}.",
    ),
    "caltech_birds2011": ("a photo of a {}, a type of bird.",),
    "oxford_flowers102": ("a photo of a {}, a type of flower.",),
}


PROMPT_SETS = ("world_fine", "world_coarse", *TEMPLATES)


def clean_class_name(dataset: str, name: str) -> str:
    """TFDS label strings as words: CUB's '001.Black_footed_Albatross' -> 'Black footed Albatross'."""
    name = re.sub(r"^\d+\.", "", name)  # CUB's numeric prefix
    return name.replace("_", " ").strip()


def class_names(builder: Any, label_key: str) -> list[str]:
    feature = builder.info.features[label_key]
    names = getattr(feature, "names", None)
    if not names:
        raise ValueError(f"{builder.name}: feature {label_key!r} is not a ClassLabel with names")
    return [clean_class_name(builder.name, n) for n in names]


def class_prompts(prompt_set: str, builder: Any, label_key: str) -> list[list[str]]:
    """Prompts [class][template] for `prompt_set`.

    "world_fine" / "world_coarse": the embedded world's own templates and names (with the
    coarse category after the opaque fine name, like CLIP's "a type of bird");
    "cars196" / "caltech_birds2011" / "oxford_flowers102": CLIP's templates with the class names
    of `builder`'s `label_key` feature.
    """
    if prompt_set in ("world_fine", "world_coarse"):
        from vlcore.world import taxonomy

        prompts = taxonomy.class_prompts(prompt_set.split("_")[1])
        expected = len(builder.info.features[label_key].names)
        if len(prompts) != expected:
            raise ValueError(f"prompt set {prompt_set}: {len(prompts)} classes, but {label_key} has {expected}")
        return prompts
    if prompt_set not in TEMPLATES:
        raise ValueError(f"unknown prompt set {prompt_set!r}; expected world_fine, world_coarse or one of "
                         f"{sorted(TEMPLATES)}")
    return [[t.format(name) for t in TEMPLATES[prompt_set]] for name in class_names(builder, label_key)]
