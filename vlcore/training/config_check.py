"""Config validation, before anything runs: unknown or missing fields, and values out of range.

A task module (the one `config.task` names) provides `default_config()`, which fixes the fields,
and may provide `config_rules(config)`: a list of `Rule`s for its own values. The training
loop's own fields (batch size, steps, optimiser, ...) are checked for every task.
"""

from __future__ import annotations

import difflib
import sys
from types import ModuleType
from typing import Any, Callable, NamedTuple

import ml_collections

from vlcore.errors import InputError


class ConfigError(InputError):
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


class Rule(NamedTuple):
    """config.<field> must satisfy `ok(value)`; `expected` says what it must be, for the message."""

    field: str
    ok: Callable[[Any], bool]
    expected: str


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: is_int(v) and v >= low


def number_in(low: float, high: float) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high


def positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda v: v in choices


def training_rules(config: ml_collections.ConfigDict) -> list[Rule]:
    """What the training loop (`vlcore.training.loop`) reads, for every task."""
    o = "optimizer."
    return [
        Rule("seed", is_int, "an integer"),
        Rule("batch_size", int_at_least(1), "an integer >= 1"),
        Rule("num_steps", int_at_least(1), "an integer >= 1"),
        Rule("log_every", int_at_least(1), "an integer >= 1"),
        Rule("save_every", int_at_least(1), "an integer >= 1"),
        Rule("keep_checkpoints", int_at_least(1), "an integer >= 1"),
        Rule("fsdp", int_at_least(1), "an integer >= 1"),
        Rule(o + "name", one_of("adamw", "sgd"), "'adamw' or 'sgd'"),
        Rule(o + "lr", positive_number, "a number > 0"),
        Rule(o + "schedule", one_of("cosine", "linear", "constant"), "'cosine', 'linear' or 'constant'"),
        Rule(o + "warmup_steps", lambda v: is_int(v) and 0 <= v <= config.num_steps,
             f"an integer in [0, num_steps={config.num_steps}]"),
        Rule(o + "weight_decay", number_in(0.0, float("inf")), "a number >= 0"),
        Rule(o + "grad_clip_norm", number_in(0.0, float("inf")), "a number >= 0 (0 = off)"),
    ]


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def check_values(config: ml_collections.ConfigDict, rules: list[Rule]) -> None:
    """Raises ConfigError naming every field whose value breaks its rule (all of them, in one line)."""
    problems = []
    for rule in rules:
        try:
            value = _get(config, rule.field)
        except (KeyError, AttributeError):
            continue  # a missing field is check_config's to report
        try:
            good = bool(rule.ok(value))
        except Exception:  # noqa: BLE001 - a value of the wrong type: the rule does not hold
            good = False
        if not good:
            problems.append(f"config.{rule.field}={value!r}: expected {rule.expected}")
    if problems:
        raise ConfigError("; ".join(problems))


def validate_config(config: ml_collections.ConfigDict, task_module: ModuleType) -> None:
    """Fields against the task's `default_config()`, then the loop's and the task's value rules."""
    check_config(config, task_module.default_config())
    rules = training_rules(config)
    if hasattr(task_module, "config_rules"):
        rules += task_module.config_rules(config)
    check_values(config, rules)


def _innermost(error: BaseException) -> BaseException:
    while error.__context__ is not None or error.__cause__ is not None:
        error = error.__cause__ or error.__context__
    return error


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for the `--config` commands, with every way a config can fail to load
    (a missing file, an unknown preset, a field the config lacks, a value of the wrong type) as one
    `error:` line and exit status 2 instead of a traceback."""
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS:  # a config file that failed to load raises on first access: here
            getattr(flags.FLAGS["config"].value, "keys", None)
        return rest
    except (flags.Error, OSError, AttributeError, KeyError, ValueError, TypeError) as e:
        if isinstance(e, (AttributeError, KeyError)):  # config_flags: --config.<field the config lacks>
            while isinstance(e, (AttributeError, KeyError)) and e.args and isinstance(e.args[0], BaseException):
                e = e.args[0]  # ml_collections wraps its own error, which holds the suggestion
            detail = " ".join(str(e.args[0] if e.args else e).split())
            message = f"a --config override names a field the config does not have: {detail}"
        elif isinstance(e, OSError) and "No such file" in str(e):
            message = f"--config: no such config file ({str(e).strip().splitlines()[-1].strip()})"
        elif "\n" not in str(e).strip():  # absl's own one-liner names the flag
            message = str(e).strip()
        else:  # a traceback text around the config file's own error: keep that error's line
            message = str(_innermost(e)).strip().splitlines()[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
