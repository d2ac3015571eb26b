"""Names a package hands on from its modules on first use (PEP 562), so importing it stays cheap."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, table: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``: ``table`` maps a public name to its module.

    The first lookup of a name imports its module and stores the value in the
    package, so later lookups never come back here.

    Example:
        >>> __getattr__, __dir__ = lazy_exports(__name__, {"train": "gainsurgery.training.loop"})  # doctest: +SKIP
    """

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
