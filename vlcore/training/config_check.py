"""Config validation: unknown or missing fields are named before anything runs."""

from __future__ import annotations

import sys

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


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with an override of a field the config lacks as a config error."""
    from absl import app as absl_app

    try:
        return absl_app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:  # raised by config_flags for --config.<unknown field>
        while isinstance(e, (AttributeError, KeyError)) and e.args and isinstance(e.args[0], BaseException):
            e = e.args[0]
        message = " ".join(str(e.args[0] if e.args else e).split())
        print(f"error: a --config override names a field the config does not have: {message}", file=sys.stderr)
        sys.exit(2)
