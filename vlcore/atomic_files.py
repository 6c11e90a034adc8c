"""Crash-safe file writes: the one implementation every writer of the project uses.

A file is written under a temporary name in its final directory and renamed over the target,
so a reader sees the old file or the whole new one, never a part: locally the temporary file
and the directory are fsynced around an atomic `os.replace`; on an object store (gs://) the
temporary is an object beside the target, renamed with overwrite, and readers trust only what a
manifest written last lists (`vlcore.fs` states the rule). Temporary names start with
`TMP_PREFIX`, so a resuming writer can find and delete what an interrupted one left behind.
"""

from __future__ import annotations

import json
import os
from typing import Any

from vlcore.fs import TMP_PREFIX, atomic_output, fsync_path, temp_path
from vlcore.fs import write_text as atomic_write_text

__all__ = ["TMP_PREFIX", "temp_path", "fsync_path", "atomic_output", "atomic_write_text", "atomic_write_json",
           "differing_keys"]


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> None:
    """JSON with sorted keys and a trailing newline (stable bytes for checksummed manifests)."""
    with atomic_output(path, "w") as f:
        json.dump(obj, f, **{"indent": 2, "sort_keys": True, **dump_kwargs})
        f.write("\n")


def differing_keys(stored: Any, wanted: dict[str, Any]) -> list[str]:
    """The keys whose values differ between a resumed writer's recorded settings and this run's."""
    if not isinstance(stored, dict):
        return sorted(wanted)
    return sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
