"""Reading the downstream tasks' JSON and JSON Lines files with errors that name file, record and field.

Every reader of `jaxmuvla.tasks` checks its records through `field`, so a bad file fails with
the same kind of one-line message (`file: record: field 'x' is ..., expected ...`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from jaxmuvla.tasks.common import TaskDataError

_MISSING = object()


def read_json(path: str | os.PathLike) -> Any:
    """The parsed JSON file (TaskDataError when it is missing or not JSON)."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except OSError as e:
        raise TaskDataError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise TaskDataError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}: bad JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def jsonl_records(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number from 1, record) of every non-blank line of a JSON Lines file."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise TaskDataError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise TaskDataError(f"{path}: line {number}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}: line {number}: bad JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise TaskDataError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def field(record: Any, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    """record[name], checked to be of `kind` (bool is not an int here: JSON true is no id)."""
    if not isinstance(record, dict):
        raise TaskDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    value = record.get(name, _MISSING)
    if value is _MISSING:
        raise TaskDataError(f"{where}: missing field {name!r}")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise TaskDataError(f"{where}: field {name!r} is {value!r:.60}, expected {expected}")
    return value


def object_list(obj: Any, key: str, path: str | os.PathLike) -> list[Any]:
    """obj[key] of a file's top-level object, checked to be a non-empty list."""
    if not isinstance(obj, dict) or key not in obj:
        raise TaskDataError(f"{path}: expected a JSON object with a {key!r} list")
    items = obj[key]
    if not isinstance(items, list):
        raise TaskDataError(f"{path}: field {key!r} is a {type(items).__name__}, expected a list")
    if not items:
        raise TaskDataError(f"{path}: {key!r} is empty")
    return items

