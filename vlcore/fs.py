"""The filesystem layer every stored artefact goes through: local paths, gs://, ram://.

Paths are strings. A local path (no `scheme://`) is handled with os/shutil, exactly as a plain
Python program would; any other (gs://, ram://, file://) with `tf.io.gfile`, whose TensorFlow
wheel registers gs:// (and ram://, an in-memory filesystem the tests use). `pathlib.Path` is not
used for stored paths: `Path("gs://b/x")` silently becomes "gs:/b/x" (`fspath` refuses such paths).

Atomic writes (`atomic_output`):
  * local: a temporary file in the target's directory, fsynced, `os.replace`d over the target and
    the directory fsynced; a reader sees the old file or the whole new one.
  * object stores: an object appears only once its upload completes, but a writer that fails half
    way still uploads what it wrote when the file is closed; so the bytes go to a temporary object
    beside the target, which is then renamed (copied) over it.

The rule for object stores: renaming a *directory* there is one copy per object, not atomic (and
ram:// loses the contents), so a multi-file artefact is written file by file in place, each file
atomically, and a reader trusts only what a manifest written LAST lists (with its checksums). A
torn temporary object or a half-filled shard directory is thus never read; a resuming writer
deletes the temporaries (names starting with `TMP_PREFIX`) and rechecks whatever it keeps.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
import shutil
import uuid
from typing import IO, Iterator

TMP_PREFIX = ".tmp-"  # temporary names start with this; resuming writers delete leftovers
_MANGLED_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/(?!/)")  # "gs:/b/x": a URI through pathlib
_COPY_CHUNK = 1 << 24


def _gfile():
    import tensorflow as tf  # only for non-local paths: local work never imports TensorFlow here

    return tf.io.gfile


def fspath(path: str | os.PathLike) -> str:
    """`path` as a string; ValueError for a URI that went through pathlib.Path ("gs:/b" for "gs://b")."""
    s = os.fspath(path)
    if _MANGLED_URI.match(s):
        raise ValueError(f"{s!r}: a URI that lost a slash (built with pathlib.Path?); pass it as a string")
    return s


def is_local(path: str | os.PathLike) -> bool:
    """True for paths of the local filesystem (no `scheme://`)."""
    return "://" not in fspath(path)


def join(path: str | os.PathLike, *names: str) -> str:
    return os.path.join(fspath(path), *names)


def basename(path: str | os.PathLike) -> str:
    return os.path.basename(fspath(path).rstrip("/"))


def dirname(path: str | os.PathLike) -> str:
    return os.path.dirname(fspath(path).rstrip("/"))


def exists(path: str | os.PathLike) -> bool:
    path = fspath(path)
    return os.path.exists(path) if is_local(path) else _gfile().exists(path)


def isdir(path: str | os.PathLike) -> bool:
    path = fspath(path)
    return os.path.isdir(path) if is_local(path) else _gfile().isdir(path)


def isfile(path: str | os.PathLike) -> bool:
    path = fspath(path)
    if is_local(path):
        return os.path.isfile(path)
    return _gfile().exists(path) and not _gfile().isdir(path)


def makedirs(path: str | os.PathLike) -> None:
    """Creates `path` and its parents; fine if it exists. (On object stores directories are name
    prefixes; creating them still matters for ram://, which lists only directories made so.)"""
    path = fspath(path)
    if is_local(path):
        os.makedirs(path, exist_ok=True)
    else:
        _gfile().makedirs(path)


def listdir(path: str | os.PathLike) -> list[str]:
    """The names in directory `path`, sorted (GCS marks subdirectories with a trailing "/": removed)."""
    path = fspath(path)
    if is_local(path):
        return sorted(os.listdir(path))
    names = [name.rstrip("/") for name in _gfile().listdir(path)]
    if path.startswith("ram://"):  # ram:// lists by string prefix: `d/a` also gets "b" of a sibling `d/ab`
        names = [name for name in names if _gfile().exists(join(path, name))]
    return sorted(names)


def remove(path: str | os.PathLike) -> None:
    path = fspath(path)
    if is_local(path):
        os.remove(path)
    else:
        _gfile().remove(path)


def rmtree(path: str | os.PathLike) -> None:
    path = fspath(path)
    if is_local(path):
        shutil.rmtree(path)
    else:
        _gfile().rmtree(path)


def rename(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Renames a file (or a local directory). Local: `os.replace` when `overwrite`, else `os.rename`
    (atomic). Object stores: a copy and a delete, atomic for the one object only."""
    src, dst = fspath(src), fspath(dst)
    if is_local(src) and is_local(dst):
        (os.replace if overwrite else os.rename)(src, dst)
    else:
        _gfile().rename(src, dst, overwrite=overwrite)


def open(path: str | os.PathLike, mode: str = "rb") -> IO:  # noqa: A001  (the layer's open)
    """A file object; text modes read and write UTF-8. Non-local files support seek and tell."""
    path = fspath(path)
    if is_local(path):
        return builtins.open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
    return _gfile().GFile(path, mode)


def read_bytes(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    with open(path, "r") as f:
        return f.read()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` atomically (see `atomic_output`)."""
    with atomic_output(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) atomically (see `atomic_output`)."""
    with atomic_output(path, "w") as f:
        f.write(text)


def size(path: str | os.PathLike) -> int:
    """The size of a file in bytes."""
    path = fspath(path)
    return os.path.getsize(path) if is_local(path) else int(_gfile().stat(path).length)


def copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies a file (across filesystems too), replacing `dst`; not atomic (see `atomic_output`)."""
    src, dst = fspath(src), fspath(dst)
    if is_local(src) and is_local(dst):
        shutil.copyfile(src, dst)
        return
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_COPY_CHUNK):
            fout.write(chunk)


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies the files under directory `src` into `dst` (created), keeping relative paths."""
    src, dst = fspath(src), fspath(dst)
    makedirs(dst)
    for name in listdir(src):
        if isdir(join(src, name)):
            copy_tree(join(src, name), join(dst, name))
        else:
            copy(join(src, name), join(dst, name))


def temp_path(path: str | os.PathLike) -> str:
    """A unique temporary name beside `path` (same directory, so the final rename is atomic)."""
    path = fspath(path)
    return join(dirname(path), f"{TMP_PREFIX}{basename(path)}-{uuid.uuid4().hex}")


def fsync_path(path: str | os.PathLike) -> None:
    """fsyncs a local file or directory (filesystems that refuse it for directories are tolerated);
    nothing for non-local paths, whose objects are durable once written."""
    path = fspath(path)
    if not is_local(path):
        return
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
    """`with atomic_output(p) as f: f.write(...)`: `p` appears complete when the block ends, or not
    at all (the old `p`, if any, stays); see the module docstring for local vs object stores."""
    path = fspath(path)
    tmp = temp_path(path)
    local = is_local(path)
    try:
        with open(tmp, mode) as f:
            yield f
            if local:
                f.flush()
                os.fsync(f.fileno())
        rename(tmp, path, overwrite=True)
    except BaseException:
        with contextlib.suppress(Exception):  # the temporary may never have been created
            remove(tmp)
        raise
    fsync_path(dirname(path) or ".")
