"""Keeping the Hub token out of everything we print, write or upload.

- :func:`redact_url` / :func:`redact`: every message the CLI prints passes through
  :func:`redact`, which drops URL user-info (``http://user:pw@host`` -> ``http://host``),
  the current token's value, ``Bearer`` credentials, ``token=`` query values and
  anything shaped like a Hugging Face token (``hf_...``).
- :func:`current_token`: the token as huggingface_hub resolves it, for comparing
  and redacting only; it is never printed.
- :func:`contains_secret`: lets ``push`` refuse any non-weight file holding the
  token's value, streamed in chunks (a token split across two chunks is found).

- :func:`install_redaction`: what libraries print on their own (log records such as
  huggingface_hub's retry warnings, which quote the request URL; Python warnings;
  an uncaught traceback) goes through :func:`redact` too. The CLI installs it.

Nothing here reads ``/proc`` (``/proc/self/environ`` is exactly where a token lives).

Example:
    >>> redact("cannot reach http://me:s3cret@hub.local/api", token=None)
    'cannot reach http://hub.local/api'
"""

from __future__ import annotations

import base64
import logging
import os
import re
import sys
import traceback
import warnings
from typing import Any, BinaryIO, Iterable

#: Shorter "tokens" are not redacted on their own: replacing every "ab" in a
#: message would garble it, and such a value is no credential.
MIN_TOKEN_CHARS = 4
#: Bytes read per step by :func:`contains_secret`.
CHUNK_BYTES = 1 << 20
#: What a redacted secret is replaced with.
MASK = "***"

# scheme://USERINFO@ : the user part stops at "/", so "http://host/a@b" (an "@" in
# the path) is left alone; the password part may hold "/" (it is still a secret).
_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s/@]*(?::[^\s@]*)?@")
_BEARER_RE = re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+")
_QUERY_TOKEN_RE = re.compile(r"(?i)([?&](?:access_token|token|api_key|apikey|password)=)[^\s&#\"']+")
# Hugging Face user/org tokens and OAuth tokens: "hf_" + 30 or more letters/digits.
_HF_TOKEN_RE = re.compile(r"\bhf_(?:oauth_)?[A-Za-z0-9]{30,}\b")


def redact_url(url: str) -> str:
    """``url`` without user-info: ``scheme://user:password@host/path`` -> ``scheme://host/path``.

    Example:
        >>> redact_url("https://user:pw@hub.example.org:8443/api?x=1")
        'https://hub.example.org:8443/api?x=1'
    """
    return _USERINFO_RE.sub(r"\1", url)


def _tokens(token: str | Iterable[str] | None) -> list[str]:
    if token is None:
        return []
    items = [token] if isinstance(token, str) else list(token)
    # Longest first, so a token that contains another is masked whole.
    return sorted({t.strip() for t in items if t and len(t.strip()) >= MIN_TOKEN_CHARS}, key=len, reverse=True)


def redact(text: str, token: str | Iterable[str] | None = None) -> str:
    """``text`` with credentials masked: URL user-info, ``token``'s value(s), Bearer, ``token=``, ``hf_...``.

    ``token`` is the current token (see :func:`current_token`) or several; values
    shorter than :data:`MIN_TOKEN_CHARS` are not masked on their own.

    Example:
        >>> redact("401 for hf_abcdefghijklmnopqrstuvwxyz0123456 at http://u:p@h", token="abcdefgh")
        '401 for *** at http://h'
    """
    out = _USERINFO_RE.sub(r"\1", text)
    out = _HF_TOKEN_RE.sub(MASK, out)
    out = _BEARER_RE.sub(lambda m: m.group(1) + MASK, out)
    out = _QUERY_TOKEN_RE.sub(lambda m: m.group(1) + MASK, out)
    # The exact value last: it may have any shape, and may sit inside anything above.
    for value in _tokens(token):
        out = out.replace(value, MASK)
    return out


def _clean(value: str | None) -> str | None:
    # As huggingface_hub cleans tokens: no line breaks, no surrounding blanks.
    if not value:
        return None
    value = value.replace("\r", "").replace("\n", "").strip()
    return value or None


def current_token() -> str | None:
    """The Hub token as huggingface_hub resolves it, or None; never printed or logged.

    ``HF_TOKEN`` (then the older ``HUGGING_FACE_HUB_TOKEN``) from the environment,
    else ``huggingface_hub.get_token()`` (the login token file, ...). huggingface_hub
    is imported only here, so the core path does not need it; any failure to
    resolve gives None rather than an error (a redaction helper must not fail).

    Example:
        >>> tok = current_token()  # doctest: +SKIP
        >>> print(redact(f"error: {tok}", token=tok))  # doctest: +SKIP
        error: ***
    """
    env = _clean(os.environ.get("HF_TOKEN")) or _clean(os.environ.get("HUGGING_FACE_HUB_TOKEN"))
    if env:
        return env
    try:
        from huggingface_hub import get_token
    except ImportError:
        return None
    try:
        return _clean(get_token())
    except Exception:  # an OIDC exchange or a token refresh that fails: no token to hide
        return None


def secret_forms(token: str) -> list[bytes]:
    """Byte strings whose presence means a file carries ``token``.

    The token as UTF-8, as UTF-16 (both byte orders), and the base64 of it (the
    three alignments, cut to the part that does not depend on neighbouring bytes).
    Empty for a token shorter than :data:`MIN_TOKEN_CHARS`.

    Example:
        >>> secret_forms("hf_abcd")[:1]
        [b'hf_abcd']
    """
    token = (token or "").strip()
    if len(token) < MIN_TOKEN_CHARS:
        return []
    raw = token.encode("utf-8")
    forms = [raw, token.encode("utf-16-le"), token.encode("utf-16-be")]
    for shift in range(3):
        enc = base64.b64encode(b"\0" * shift + raw)
        # Drop the characters mixed with the pad bytes in front and the tail mixed with what follows.
        head = (shift * 4 + 2) // 3
        core = enc[head:(len(raw) + shift) * 4 // 3]
        if len(core) >= MIN_TOKEN_CHARS:
            forms.append(core)
    return list(dict.fromkeys(forms))


def contains_secret(source: str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO,
                    token: str | None, *, chunk_bytes: int = CHUNK_BYTES) -> bool:
    """True when ``source`` holds ``token`` (in any of :func:`secret_forms`).

    ``source`` is bytes, a binary file object, or a path (opened without blocking;
    a FIFO or device raises :class:`~gainsurgery.errors.UnsafeInputError`). Files
    are streamed ``chunk_bytes`` at a time; the last ``len(form) - 1`` bytes of each
    chunk are kept, so a token split across two chunks is still found. A token of
    None (or shorter than :data:`MIN_TOKEN_CHARS`) is never found.

    Example:
        >>> contains_secret(b"x = hf_abcdefgh", "hf_abcdefgh"), contains_secret(b"x", "hf_abcdefgh")
        (True, False)
    """
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be positive")
    forms = secret_forms(token or "")
    if not forms:
        return False
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return any(f in data for f in forms)
    if isinstance(source, (str, os.PathLike)):
        from gainsurgery.io.inputs import open_regular

        with open_regular(source) as f:
            return _scan(f, forms, chunk_bytes)
    return _scan(source, forms, chunk_bytes)


def _scan(f: BinaryIO, forms: list[bytes], chunk_bytes: int) -> bool:
    keep = max(len(x) for x in forms) - 1
    tail = b""
    while True:
        chunk = f.read(chunk_bytes)
        if not chunk:
            return False
        window = tail + chunk
        if any(x in window for x in forms):
            return True
        tail = window[-keep:] if keep else b""


_installed: list[bool] = []


def install_redaction() -> None:
    """Make what this process prints through libraries pass :func:`redact` too (idempotent).

    - every ``logging`` record (huggingface_hub's retry warnings quote the request
      URL, and with ``HF_ENDPOINT=http://user:pw@host`` the URL holds the password);
    - Python warnings, as they are formatted;
    - an uncaught exception's traceback (a bug still shows its traceback, without
      credentials).

    The token to mask is resolved once, on first use (:func:`current_token`).

    Example:
        >>> install_redaction()  # doctest: +SKIP
        >>> logging.getLogger("x").warning("GET http://me:pw@hub/api")  # doctest: +SKIP
        GET http://hub/api
    """
    if _installed:
        return
    _installed.append(True)
    cached: list[str | None] = []

    def token() -> str | None:
        if not cached:
            cached.append(current_token())
        return cached[0]

    make_record = logging.getLogRecordFactory()

    def record_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's to report
            return record
        clean = redact(message, token())
        if clean != message:
            record.msg, record.args = clean, None
        return record

    logging.setLogRecordFactory(record_factory)
    format_warning = warnings.formatwarning
    warnings.formatwarning = lambda *a, **k: redact(format_warning(*a, **k), token())  # type: ignore[assignment]

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb)), token()))

    sys.excepthook = excepthook
