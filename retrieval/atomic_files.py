"""Crash-safe file writes shared by the memory store and the neighbour precompute.

A file is written under a temporary name in its final directory, fsynced, renamed over the
target (atomic on POSIX) and the directory fsynced, so a reader sees the old file or the
whole new one, never a part.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"  # temporary names start with this; resuming writers delete leftovers


def temp_path(path: Path) -> Path:
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


def atomic_write_json(path: Path, obj: Any) -> None:
    tmp = temp_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
