"""Crash-safe file writes: the one implementation every writer of the project uses.

A file is written under a temporary name in its final directory, fsynced, renamed over the
target (atomic on POSIX) and the directory fsynced, so a reader sees the old file or the whole
new one, never a part. Temporary names start with `TMP_PREFIX`, so a resuming writer can find
and delete what an interrupted one left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

TMP_PREFIX = ".tmp-"  # temporary names start with this; resuming writers delete leftovers


def temp_path(path: Path) -> Path:
    """A unique temporary name beside `path` (same directory, so the final rename is atomic)."""
    path = Path(path)
    return path.parent / f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex}"


def fsync_path(path: Path) -> None:
    """fsync a file or directory; filesystems that refuse it for directories are tolerated."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """`with atomic_output(p) as f: f.write(...)`: `p` appears complete when the block ends, or not at all."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_output(path, "w") as f:
        f.write(text)


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
