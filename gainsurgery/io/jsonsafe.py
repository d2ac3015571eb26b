"""Parsing JSON that someone else wrote: every JSON we read is hostile.

Safetensors headers, ``model.safetensors.index.json``, ``config.json``, gain
metadata, ``adapter_config.json``, ``gainsurgery.json`` and manifests all come from
files other people made. Each is parsed here, with

- a size limit in bytes, checked while reading (a file never reads past it);
- a nesting-depth limit checked by a flat scan *before* parsing, so a
  200,000-deep ``[[[[...`` is one line of error, never a ``RecursionError``;
- strict JSON: ``NaN``/``Infinity`` and numbers that overflow a float refused,
  duplicate object keys refused where asked (safetensors headers need it: with
  duplicates, one byte range would silently go unscaled);
- small typed accessors (:class:`Fields`, ``expect_*``) that check the shape of
  what was parsed and fail with one line naming the file and the field.

Errors are whichever :class:`~gainsurgery.errors.GainSurgeryError` subclass the
caller names (``CheckpointError`` for headers, ``GainFileError`` for gain metadata...).

Example:
    >>> cfg = Fields(load(base / "config.json", error=CheckpointError), where="config.json",
    ...              error=CheckpointError)  # doctest: +SKIP
    >>> cfg.str("model_type")  # doctest: +SKIP
    'llama'
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, BinaryIO, Callable, Iterator

from gainsurgery.errors import GainSurgeryError
from gainsurgery.io.inputs import open_regular, show_path

#: Default size limit for a JSON file or string, in bytes.
DEFAULT_MAX_BYTES = 16 << 20
#: Default nesting limit (objects and arrays); real configs and headers need under 10.
DEFAULT_MAX_DEPTH = 64
#: Hard ceiling on any depth limit: Python's JSON parser recurses in C, one level per
#: nesting level, and must stay far below the interpreter's recursion limit.
MAX_DEPTH_CEILING = 256
#: Default size limit for one line of a JSON-lines file, in bytes.
DEFAULT_MAX_LINE_BYTES = 1 << 20

# A JSON string (escapes included), or a single bracket. Strings are skipped whole so
# that brackets inside them do not count. The unrolled form is linear, no backtracking.
_TOKEN_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)

_MISSING: Any = object()
# Where a lone surrogate can come from: an escape of one (or, in a str, the character itself).
_SURROGATE_RE = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")


class _Refused(ValueError):
    """Raised from parser hooks; carries the reason to the one-line error."""


def nesting_depth(text: str, limit: int) -> int:
    """The maximum nesting depth of JSON ``text``, scanning flat (no recursion).

    Stops scanning as soon as the depth exceeds ``limit`` and returns that
    depth (``limit + 1``), so a hostile 200,000-deep document costs one short scan.
    Brackets inside strings do not count. Malformed text gives some number; the
    parser rejects it afterwards.

    Example:
        >>> nesting_depth('{"a": [1, "]]]", {"b": []}]}', 64)
        4
    """
    depth = deepest = 0
    for m in _TOKEN_RE.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif c in "]}":
            depth -= 1
    return deepest


def _lone_surrogate(value: Any) -> bool:
    """True when a string anywhere in parsed ``value`` (keys too) cannot be encoded as UTF-8. Flat, no recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key {show_path(key)}")
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {text[:40]} overflows a float")
    return value


def loads(data: str | bytes | bytearray, *, where: str, error: type[GainSurgeryError] = GainSurgeryError,
          max_bytes: int = DEFAULT_MAX_BYTES, max_depth: int = DEFAULT_MAX_DEPTH,
          unique_keys: bool = False) -> Any:
    """Parse hostile JSON ``data`` (UTF-8 when bytes) within limits; ``error`` in one line otherwise.

    Args:
        data: the JSON text.
        where: names the source in messages (a file name, ``"model.safetensors header"``).
        error: the GainSurgeryError subclass to raise.
        max_bytes: size limit in bytes (UTF-8 bytes for ``str``).
        max_depth: nesting limit (objects + arrays), at most :data:`MAX_DEPTH_CEILING`.
        unique_keys: refuse an object with the same key twice.

    Example:
        >>> loads('{"a": 1, "a": 2}', where="h", unique_keys=True)
        Traceback (most recent call last):
        ...
        gainsurgery.errors.GainSurgeryError: h: not valid JSON (duplicate key a)
    """
    if not 0 < max_depth <= MAX_DEPTH_CEILING:
        raise ValueError(f"max_depth must be in 1..{MAX_DEPTH_CEILING}, got {max_depth}")
    size = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
    if size > max_bytes:
        raise error(f"{where}: {size} bytes of JSON, more than the {max_bytes} allowed")
    if isinstance(data, (bytes, bytearray)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where}: not valid UTF-8 (at byte {e.start})") from None
    else:
        text = data
    depth = nesting_depth(text, max_depth)
    if depth > max_depth:
        raise error(f"{where}: JSON nested deeper than {max_depth} levels")
    try:
        value = json.loads(text, object_pairs_hook=_unique_pairs if unique_keys else None,
                           parse_constant=_refuse_constant, parse_float=_finite_float)
        # JSON may spell half of a UTF-16 pair alone ("\ud800"); Python keeps it as a lone surrogate,
        # which no file, message or upload can encode later. safetensors (serde_json) refuses it too.
        if _SURROGATE_RE.search(text) and _lone_surrogate(value):
            raise _Refused("a string holds a lone UTF-16 surrogate, which is not Unicode text")
        return value
    except _Refused as e:
        raise error(f"{where}: not valid JSON ({e})") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        # ValueError: an integer beyond Python's digit limit; RecursionError: only if the
        # flat scan and the parser ever disagree (belt and braces).
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).split("\n")[0][:120]
        raise error(f"{where}: not valid JSON ({reason})") from None


#: Bytes read at a time: ``read(max_bytes + 1)`` would allocate the whole limit up front (512 MiB to
#: read a 1 KiB record with a 512 MiB limit); reading in pieces costs what the file holds.
_READ_PIECE = 1 << 20


def _read_limited(f: BinaryIO, max_bytes: int, where: str, error: type[GainSurgeryError]) -> bytes:
    pieces, total = [], 0
    while total <= max_bytes:
        piece = f.read(min(_READ_PIECE, max_bytes + 1 - total))
        if not piece:
            break
        pieces.append(piece)
        total += len(piece)
    if total > max_bytes:
        raise error(f"{where}: more than the {max_bytes} bytes allowed for this JSON file")
    return b"".join(pieces)


def load(source: str | os.PathLike[str] | BinaryIO, *, where: str | None = None,
         error: type[GainSurgeryError] = GainSurgeryError, max_bytes: int = DEFAULT_MAX_BYTES,
         max_depth: int = DEFAULT_MAX_DEPTH, unique_keys: bool = False) -> Any:
    """Parse a hostile JSON file within limits (see :func:`loads`).

    ``source`` is a path (opened with :func:`~gainsurgery.io.inputs.open_regular`:
    a FIFO or device is refused without blocking) or a binary file object already
    opened safely (e.g. by :func:`~gainsurgery.io.inputs.open_input`). At most
    ``max_bytes + 1`` bytes are ever read, whatever the file claims to hold.

    Example:
        >>> index = load(base / "model.safetensors.index.json", error=CheckpointError)  # doctest: +SKIP
    """
    if isinstance(source, (str, os.PathLike)):
        where = where or show_path(source)
        with open_regular(source, error=error) as f:
            data = _read_limited(f, max_bytes, where, error)
    else:
        where = where or show_path(getattr(source, "name", "JSON"))
        data = _read_limited(source, max_bytes, where, error)
    return loads(data, where=where, error=error, max_bytes=max_bytes, max_depth=max_depth,
                 unique_keys=unique_keys)


def iter_jsonl(source: str | os.PathLike[str] | BinaryIO, *, where: str | None = None,
               error: type[GainSurgeryError] = GainSurgeryError, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
               max_depth: int = DEFAULT_MAX_DEPTH, max_lines: int | None = None,
               unique_keys: bool = False) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, value)`` for each non-blank line of a hostile JSON-lines file.

    Each line has the limits of :func:`loads` (``max_line_bytes`` in bytes, without the
    newline); a line is never read past its limit. ``max_lines`` caps the number of
    lines (blank ones included). Messages read ``FILE:LINE: ...``.

    Example:
        >>> for lineno, row in iter_jsonl("manifest.jsonl", error=CheckpointError):  # doctest: +SKIP
        ...     name = Fields(row, where=f"manifest.jsonl:{lineno}", error=CheckpointError).str("name")
    """
    if isinstance(source, (str, os.PathLike)):
        where = where or show_path(source)
        with open_regular(source, error=error) as f:
            yield from _jsonl_lines(f, where, error, max_line_bytes, max_depth, max_lines, unique_keys)
    else:
        where = where or show_path(getattr(source, "name", "JSON lines"))
        yield from _jsonl_lines(source, where, error, max_line_bytes, max_depth, max_lines, unique_keys)


def _jsonl_lines(f: BinaryIO, where: str, error: type[GainSurgeryError], max_line_bytes: int,
                 max_depth: int, max_lines: int | None, unique_keys: bool) -> Iterator[tuple[int, Any]]:
    lineno = 0
    while True:
        # +2: room for "\r\n" so a line of exactly max_line_bytes still fits.
        line = f.readline(max_line_bytes + 2)
        if not line:
            return
        lineno += 1
        if max_lines is not None and lineno > max_lines:
            raise error(f"{where}: more than the {max_lines} lines allowed")
        body = line.rstrip(b"\r\n")
        if len(body) > max_line_bytes:
            raise error(f"{where}:{lineno}: line longer than the {max_line_bytes} bytes allowed")
        if not body.strip():
            continue
        yield lineno, loads(body, where=f"{where}:{lineno}", error=error, max_bytes=max_line_bytes,
                            max_depth=max_depth, unique_keys=unique_keys)


# ---------------------------------------------------------------------------------
# Typed accessors. Each takes the value, where it came from and which field it is,
# and returns it typed or raises ``error`` with "WHERE: FIELD: expected X, got Y".

#: Python type -> JSON type name, in the order they must be tested.
_JSON_TYPE_NAMES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
                    (dict, "object"))


def type_name(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages (``bool`` is not a number).

    Example:
        >>> type_name(True), type_name(3), type_name([]), type_name(None)
        ('boolean', 'integer', 'array', 'null')
    """
    if value is None:
        return "null"
    for kind, name in _JSON_TYPE_NAMES:  # bool before int: True is an int to Python
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _fail(error: type[GainSurgeryError], where: str, field: str, expected: str, value: Any) -> GainSurgeryError:
    label = f"{where}: {field}" if field else where
    return error(f"{label}: expected {expected}, got {type_name(value)}")


def expect_object(value: Any, *, where: str, field: str = "",
                  error: type[GainSurgeryError] = GainSurgeryError) -> dict[str, Any]:
    """``value`` if it is a JSON object, else ``error``.

    Example:
        >>> expect_object([], where="config.json")
        Traceback (most recent call last):
        ...
        gainsurgery.errors.GainSurgeryError: config.json: expected object, got array
    """
    if not isinstance(value, dict):
        raise _fail(error, where, field, "object", value)
    return value


def expect_str(value: Any, *, where: str, field: str = "", error: type[GainSurgeryError] = GainSurgeryError,
               max_chars: int | None = None) -> str:
    """``value`` if it is a string (of at most ``max_chars`` characters), else ``error``."""
    if not isinstance(value, str):
        raise _fail(error, where, field, "string", value)
    if max_chars is not None and len(value) > max_chars:
        label = f"{where}: {field}" if field else where
        raise error(f"{label}: string of {len(value)} characters, more than the {max_chars} allowed")
    return value


def expect_int(value: Any, *, where: str, field: str = "", error: type[GainSurgeryError] = GainSurgeryError,
               min: int | None = None, max: int | None = None) -> int:
    """``value`` if it is an integer (not a boolean) within ``[min, max]``, else ``error``.

    Example:
        >>> expect_int(True, where="config.json", field="num_hidden_layers")
        Traceback (most recent call last):
        ...
        gainsurgery.errors.GainSurgeryError: config.json: num_hidden_layers: expected integer, got boolean
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(error, where, field, "integer", value)
    label = f"{where}: {field}" if field else where
    if min is not None and value < min:
        raise error(f"{label}: {value} is below the minimum {min}")
    if max is not None and value > max:
        raise error(f"{label}: {value} is above the maximum {max}")
    return value


def expect_number(value: Any, *, where: str, field: str = "",
                  error: type[GainSurgeryError] = GainSurgeryError) -> float:
    """``value`` as a finite float if it is a JSON number (not a boolean), else ``error``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(error, where, field, "number", value)
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        label = f"{where}: {field}" if field else where
        raise error(f"{label}: number is not finite")
    return out


def expect_bool(value: Any, *, where: str, field: str = "", error: type[GainSurgeryError] = GainSurgeryError) -> bool:
    """``value`` if it is ``true`` or ``false``, else ``error``."""
    if not isinstance(value, bool):
        raise _fail(error, where, field, "boolean", value)
    return value


def expect_str_list(value: Any, *, where: str, field: str = "",
                    error: type[GainSurgeryError] = GainSurgeryError) -> list[str]:
    """``value`` if it is an array of strings, else ``error`` naming the first bad item.

    Example:
        >>> expect_str_list(["q_proj", 3], where="adapter_config.json", field="target_modules")
        Traceback (most recent call last):
        ...
        gainsurgery.errors.GainSurgeryError: adapter_config.json: target_modules[1]: expected string, got integer
    """
    if not isinstance(value, list):
        raise _fail(error, where, field, "array of strings", value)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _fail(error, where, f"{field}[{i}]", "string", item)
    return value


def expect_str_map(value: Any, *, where: str, field: str = "",
                   error: type[GainSurgeryError] = GainSurgeryError) -> dict[str, str]:
    """``value`` if it is an object whose values are all strings (safetensors ``__metadata__``), else ``error``.

    Example:
        >>> expect_str_map({"format": "pt", "n": 1}, where="g.safetensors header", field="__metadata__")
        Traceback (most recent call last):
        ...
        gainsurgery.errors.GainSurgeryError: g.safetensors header: __metadata__.n: expected string, got integer
    """
    if not isinstance(value, dict):
        raise _fail(error, where, field, "object of strings", value)
    for key, item in value.items():
        if not isinstance(item, str):
            raise _fail(error, where, f"{field}.{show_path(key)}" if field else show_path(key), "string", item)
    return value


class Fields:
    """Typed, named access to a parsed JSON object.

    Wraps an object (checked on construction) and reads its fields with one-line
    errors that name the file and the full field path (``text_config.model_type``).
    Every getter takes ``default``: without it the field is required; with it a
    missing field (or an explicit ``null``) gives ``default``.

    Example:
        >>> cfg = Fields({"model_type": "gemma3", "text_config": {"hidden_size": 640}},
        ...              where="config.json")
        >>> cfg.str("model_type"), cfg.obj("text_config").int("hidden_size", min=1)
        ('gemma3', 640)
        >>> cfg.obj("text_config").str("model_type")
        Traceback (most recent call last):
        ...
        gainsurgery.errors.GainSurgeryError: config.json: text_config.model_type: missing
    """

    def __init__(self, value: Any, *, where: str, error: type[GainSurgeryError] = GainSurgeryError,
                 path: str = "") -> None:
        self.value: dict[str, Any] = expect_object(value, where=where, field=path, error=error)
        self.where = where
        self.error = error
        self.path = path

    def _field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str, default: Any) -> Any:
        value = self.value.get(key)
        if value is None:
            if default is _MISSING:
                why = "missing" if key not in self.value else "null, a value is required"
                raise self.error(f"{self.where}: {self._field(key)}: {why}")
            return _MISSING
        return value

    def __contains__(self, key: object) -> bool:
        return key in self.value

    def keys(self) -> list[str]:
        """The object's keys, in file order."""
        return list(self.value)

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        """The field's parsed value, unchecked."""
        value = self._get(key, default)
        return default if value is _MISSING else value

    def str(self, key: str, default: Any = _MISSING, *, max_chars: int | None = None) -> Any:
        """A string field."""
        value = self._get(key, default)
        if value is _MISSING:
            return default
        return expect_str(value, where=self.where, field=self._field(key), error=self.error, max_chars=max_chars)

    def _typed(self, key: str, default: Any, expect: Callable[..., Any], **bounds: Any) -> Any:
        """Field ``key`` checked by ``expect`` (``default`` when absent and one is given)."""
        value = self._get(key, default)
        if value is _MISSING:
            return default
        return expect(value, where=self.where, field=self._field(key), error=self.error, **bounds)

    def int(self, key: str, default: Any = _MISSING, *, min: int | None = None, max: int | None = None) -> Any:
        """An integer field (booleans refused), optionally within ``[min, max]``."""
        return self._typed(key, default, expect_int, min=min, max=max)

    def number(self, key: str, default: Any = _MISSING) -> Any:
        """A finite number field, as float."""
        return self._typed(key, default, expect_number)

    def bool(self, key: str, default: Any = _MISSING) -> Any:
        """A boolean field."""
        return self._typed(key, default, expect_bool)

    def str_list(self, key: str, default: Any = _MISSING) -> Any:
        """An array-of-strings field."""
        return self._typed(key, default, expect_str_list)

    def str_map(self, key: str, default: Any = _MISSING) -> Any:
        """An object-of-strings field."""
        return self._typed(key, default, expect_str_map)

    def obj(self, key: str, default: Any = _MISSING) -> Any:
        """A nested object field, as :class:`Fields` (errors name ``outer.inner``)."""
        value = self._get(key, default)
        if value is _MISSING:
            return default
        return Fields(value, where=self.where, error=self.error, path=self._field(key))
