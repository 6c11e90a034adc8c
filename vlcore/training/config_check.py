"""Config validation: unknown or missing fields are named before anything runs."""

from __future__ import annotations

import difflib

import ml_collections


class ConfigError(ValueError):
    """A config that does not have the fields its trainer reads."""


def _flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def check_config(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming every unknown field (with a suggestion) and every missing one."""
    have, want = _flat(config), _flat(reference)
    problems = []
    for key in sorted(set(have) - set(want)):
        close = difflib.get_close_matches(key, list(want), n=1)
        problems.append(f"unknown field config.{key}" + (f" (did you mean config.{close[0]}?)" if close else ""))
    problems += [f"missing field config.{key}" for key in sorted(set(want) - set(have))]
    if problems:
        raise ConfigError("; ".join(problems))
