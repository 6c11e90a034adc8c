"""Every config file of configs/ loads with each of its presets and passes its task's validation
(unknown or missing fields, values out of range), so a launch command in a config's header
cannot fail on the config itself."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest

from vlcore.training.config_check import validate_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ARGS = {  # the presets / arguments each config takes (None: its default)
    "two_tower_world": [None, "tiny", "quick", "default"],
    "reco_world": [None, "tiny", "quick", "default"],
    "reco_hf_clip": [None],
    "muvla_world": [None, "tiny", "quick", "main", "default"],
    "muvla_vinvl": [None],
    "muvla_finetune_world": [None, *(f"{t},{p}" for t in ("vqa", "nlvr2", "ve", "refcoco") for p in ("tiny", "quick", "main"))],
    "muvla_finetune_vinvl": ["vqa", "nlvr2", "ve", "refcoco"],
}


def test_every_config_file_is_covered():
    assert sorted(p.stem for p in CONFIGS.glob("*.py")) == sorted(ARGS)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in ARGS.items() for a in args])
def test_config_validates(name, arg):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    validate_config(config, importlib.import_module(config.task))


def test_an_unknown_preset_is_refused():
    spec = importlib.util.spec_from_file_location("m", CONFIGS / "muvla_finetune_world.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        module.get_config("vqa,huge")
