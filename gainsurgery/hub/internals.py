"""The one seam to huggingface_hub's private names, and the explicit Xet/LFS switch.

Everywhere else gainsurgery uses huggingface_hub's public API. Three things it needs
have no public name (huggingface_hub 2.x), so they live here and nowhere else; a
release that renames one breaks this file only:

- **which transport an upload takes**: Xet when ``hf_xet`` is installed and
  ``HF_HUB_DISABLE_XET`` is unset, classic LFS otherwise. huggingface_hub decides with
  its private ``utils._runtime.is_xet_available``, imported by name into the modules
  that upload. The Hub-to-Hub pipeline must know the answer (an LFS upload is read
  through our progress reader and resumes by asking the LFS batch endpoint; Xet reads
  the file itself and resumes by chunk), so :func:`xet_uploads` asks the same function;
  :func:`upload_transport` sets the answer explicitly for a block of code;
- **whether an upload operation is done**: ``CommitOperationAdd._is_uploaded``, set by
  ``HfApi.preupload_lfs_files`` (:func:`is_uploaded`);
- **the logger of request retries**, whose warnings quote the request URL (credentials
  included) and which :mod:`gainsurgery.io.secrets` filters (:data:`RETRY_LOGGER`).

Tests switch transports through :func:`upload_transport` (and reach the loopback Hub
through ``HF_ENDPOINT``); none of them imports a private huggingface_hub module.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

#: The transports :func:`upload_transport` can choose. "auto" is huggingface_hub's own choice.
TRANSPORTS = ("auto", "lfs", "xet")
#: The logger huggingface_hub's HTTP retries warn through (their message quotes the URL).
RETRY_LOGGER = "huggingface_hub.utils._http"
#: The modules that hold huggingface_hub's Xet check by name (``from .utils._runtime import is_xet_available``).
_XET_CHECK_HOLDERS = ("huggingface_hub.utils._runtime", "huggingface_hub._commit_api", "huggingface_hub.hf_api")
_XET_SESSION_HOLDER = "huggingface_hub.utils._xet"
_switch_lock = threading.Lock()


def xet_uploads() -> bool:
    """True when huggingface_hub uploads through Xet now, False when through classic LFS.

    Example:
        >>> with upload_transport("lfs"):
        ...     xet_uploads()
        False
    """
    from huggingface_hub.utils._runtime import is_xet_available

    return bool(is_xet_available())


def is_uploaded(operation: Any) -> bool:
    """True when ``preupload_lfs_files`` has uploaded ``operation`` (a ``CommitOperationAdd``)
    or found its object already stored."""
    return bool(getattr(operation, "_is_uploaded", False))


@contextlib.contextmanager
def upload_transport(kind: str, *, xet_session: Callable[[], Any] | None = None) -> Iterator[None]:
    """Make huggingface_hub upload through ``kind`` inside the block, then restore its own choice.

    Args:
        kind: ``"lfs"`` (classic LFS, as with ``HF_HUB_DISABLE_XET=1``), ``"xet"`` (needs
            ``hf_xet``, unless ``xet_session`` stands in for it) or ``"auto"`` (no change).
        xet_session: replaces hf_xet's session factory for the block (a recording stand-in:
            the Xet protocol needs a CAS server, which no test Hub serves).

    The switch is process-wide (huggingface_hub reads it from module globals), so blocks
    must not overlap across threads; a second block while one is active raises.

    Raises:
        ValueError: an unknown ``kind``; RuntimeError: another switch is active.
    """
    if kind not in TRANSPORTS:
        raise ValueError(f"upload transport {kind!r}: expected one of {', '.join(TRANSPORTS)}")
    if kind == "auto" and xet_session is None:
        yield
        return
    if not _switch_lock.acquire(blocking=False):
        raise RuntimeError("another upload_transport block is active")
    saved: list[tuple[Any, str, Any]] = []
    try:
        if kind != "auto":
            def answer() -> bool:
                return kind == "xet"

            for name in _XET_CHECK_HOLDERS:
                module = importlib.import_module(name)
                saved.append((module, "is_xet_available", module.is_xet_available))
                module.is_xet_available = answer
        if xet_session is not None:
            module = importlib.import_module(_XET_SESSION_HOLDER)
            saved.append((module, "get_xet_session", module.get_xet_session))
            module.get_xet_session = xet_session
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)
        _switch_lock.release()
