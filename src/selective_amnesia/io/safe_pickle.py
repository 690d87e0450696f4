"""An allow-list unpickler for data files (MNIST wheel, CIFAR batches) that cannot execute code.

A pickle runs code by naming a global (``os.system``, ``builtins.eval``...) and calling it. ``SafeUnpickler``
resolves only the globals in ``allowed``, and every allowed name maps to a resolver fixed in this module, so a
caller can narrow the set but never admit an arbitrary callable. What a plain data pickle needs:

* numpy arrays: ``_reconstruct`` (named ``numpy.core.multiarray`` by numpy 1 and Python 2, ``numpy._core``
  by numpy 2), ``numpy.ndarray`` and ``numpy.dtype``; ``_frombuffer`` for protocol-5 pickles.
* ``bytes`` written by Python 3 at protocol 2 (which has no bytes opcode): ``_codecs.encode(text, "latin1")``,
  and ``__builtin__.bytes()`` for ``b""``. Python 2 pickles (the real CIFAR-10 batches) store ``str`` with an
  opcode and need neither. Both resolvers check their arguments: latin-1 only, no arguments to ``bytes``.

dict, list, tuple, str, int and float are opcodes, not globals, so they are always available.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any, Protocol

import numpy as np

NUMPY_ARRAY_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }
)
"""Globals a pickled plain numpy array (numeric dtype) refers to, under any protocol."""

PY3_PROTOCOL2_BYTES_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("_codecs", "encode"), ("__builtin__", "bytes"), ("builtins", "bytes")}
)
"""Globals Python 3 uses to write ``bytes`` at pickle protocol 2 (checked: latin-1 text, or ``bytes()``)."""


class ReadableFile(Protocol):
    """What an unpickler reads from: a binary file, ``io.BytesIO``, ``gzip.GzipFile``..."""

    def read(self, n: int = ..., /) -> bytes: ...

    def readline(self) -> bytes: ...


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list (or calls an allowed one with unsafe arguments)."""


def _numpy_core_attr(submodule: str, name: str) -> Any:
    # numpy 2 moved numpy.core to numpy._core; resolve to whichever this numpy has.
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"this numpy has no {submodule}.{name}")


def _latin1_encode(text: object, encoding: object) -> bytes:
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r} (only latin1 text)")
    return text.encode("latin1")


def _empty_bytes(*args: object) -> bytes:
    if args:
        raise UnsafePickleError("refusing bytes(...) with arguments (only bytes() for b'')")
    return b""


_RESOLVERS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_core_attr("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_core_attr("multiarray", "_reconstruct"),
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_core_attr("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_core_attr("numeric", "_frombuffer"),
    ("_codecs", "encode"): lambda: _latin1_encode,
    ("__builtin__", "bytes"): lambda: _empty_bytes,
    ("builtins", "bytes"): lambda: _empty_bytes,
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ``allowed`` globals (default: numpy arrays) and refuses the rest.

    ``allowed`` must be a subset of ``NUMPY_ARRAY_GLOBALS | PY3_PROTOCOL2_BYTES_GLOBALS``; anything else is a
    ``ValueError`` here, not a way to widen the list. ``encoding`` decodes Python 2 ``str``: "latin1" (the
    default) is lossless and is what numpy needs to read Python 2 arrays.
    """

    def __init__(
        self,
        file: ReadableFile,
        *,
        allowed: AbstractSet[tuple[str, str]] | None = None,
        encoding: str = "latin1",
    ) -> None:
        super().__init__(file, encoding=encoding)
        chosen = NUMPY_ARRAY_GLOBALS if allowed is None else frozenset(allowed)
        unknown = chosen - _RESOLVERS.keys()
        if unknown:
            raise ValueError(f"no safe resolver for {sorted(unknown)}: SafeUnpickler cannot allow them")
        self._allowed = chosen

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._allowed:
            raise UnsafePickleError(f"refusing to load global {module}.{name} from a data file")
        return _RESOLVERS[(module, name)]()

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing a persistent id in a data file")


def safe_load(
    fileobj: ReadableFile,
    allowed: AbstractSet[tuple[str, str]] | None = None,
    encoding: str = "latin1",
) -> Any:
    """Unpickle ``fileobj`` with ``SafeUnpickler``; raises ``UnsafePickleError`` on a disallowed global."""
    return SafeUnpickler(fileobj, allowed=allowed, encoding=encoding).load()
