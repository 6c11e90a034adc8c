"""Loading a pickle written by someone else without running its code (RefCOCO+'s `refs(unc).p`).

A pickle names functions for the loader to import and call: `pickle.load` calls whatever the file
names, `os.system` included. This loader resolves no name but `set` and `frozenset`, so a file
can only build lists, dicts, tuples, strings, numbers and sets, and it loads at all only when the
caller opted in (a corrupt or hostile file then fails with an error, not with its code run).
"""

from __future__ import annotations

import os
import pickle
from typing import Any

from jaxmuvla.tasks.common import TaskDataError

# Python 2 pickles (RefCOCO+'s) name the builtins module "__builtin__"
_ALLOWED = {(module, name): builtin for module in ("builtins", "__builtin__")
            for name, builtin in (("set", set), ("frozenset", frozenset))}


class PlainDataUnpickler(pickle.Unpickler):
    """An Unpickler that refuses every global but set/frozenset, and persistent ids."""

    def __init__(self, file, source: str | os.PathLike):
        # latin1: a Python 2 `str` is bytes; latin1 maps each byte to one character, losslessly
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        raise TaskDataError(f"{self.source}: refused to load: the pickle asks for {module}.{name}, which is "
                            "not plain data (only lists, dicts, tuples, strings, numbers and sets are loaded)")

    def persistent_load(self, pid: Any) -> Any:
        raise TaskDataError(f"{self.source}: refused to load: the pickle holds a persistent id, not plain data")


def load_restricted_pickle(path: str | os.PathLike, allow_pickle: bool) -> Any:
    """The plain data (lists, dicts, strings, numbers, sets) of a pickle file; only with allow_pickle=True."""
    if allow_pickle is not True:
        raise TaskDataError(f"{path}: is a pickle, and loading a pickle can run code it names; for a file "
                            "from a source you trust, opt in with allow_pickle=True (fine-tuning: "
                            "--config.data.allow_pickle=True); it is then loaded as plain data only")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise TaskDataError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        try:
            return PlainDataUnpickler(f, path).load()
        except TaskDataError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                OverflowError) as e:  # what a truncated or corrupt pickle raises
            raise TaskDataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
