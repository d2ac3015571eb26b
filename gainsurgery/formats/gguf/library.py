"""The one place that imports the ``gguf`` library (an optional extra), and its reader made affordable.

``gguf`` is imported only inside functions of this package, through :func:`gguf_module`,
so the core install (without the extra) imports nothing heavy and a command given a
GGUF says in one line which extra to install.

:class:`FastReader` is the library's own ``GGUFReader`` with one change: its byte
slicing works on a plain ``ndarray`` view of the memory map instead of the
``np.memmap`` subclass. Parsing is unchanged (same code, same fields, same tensor
views), but every one of the ~10^6 small slices a real vocabulary needs no longer
pays ``np.memmap``'s per-slice bookkeeping: about 3x faster on Gemma 3's 262,144-token
vocabulary. If a future ``gguf`` changes that private helper, the stock reader is
used instead (slower, same results).
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from types import ModuleType
from typing import Any

from gainsurgery.extras import require_extra

#: What a command says when the ``gguf`` extra is missing.
WHO = "a GGUF file"


def gguf_module() -> ModuleType:
    """Import and return the ``gguf`` library.

    Raises:
        MissingExtraError: ``gguf`` is not installed (one line naming the extra).
    """
    require_extra("gguf", WHO)
    import gguf

    return gguf


@lru_cache(maxsize=1)
def reader_class() -> type:
    """The reader to use: :class:`FastReader` when the library's helper has the shape we rely on."""
    gguf = gguf_module()
    import numpy as np

    base = gguf.GGUFReader
    helper = getattr(base, "_get", None)
    try:
        params = list(inspect.signature(helper).parameters) if helper is not None else []
    except (TypeError, ValueError):
        params = []
    if params != ["self", "offset", "dtype", "count", "override_order"]:
        return base

    class FastReader(base):  # type: ignore[misc, valid-type]
        """``gguf.GGUFReader`` slicing a plain ndarray view of its memory map (see the module docstring)."""

        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
            plain = self.__dict__.get("_plain_view")
            if plain is None:
                plain = self.__dict__["_plain_view"] = self.data.view(np.ndarray)
            count = int(count)
            itemsize = np.dtype(dtype).itemsize
            arr = plain[offset:offset + itemsize * count].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return FastReader
