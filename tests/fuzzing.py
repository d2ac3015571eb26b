"""Property-based fuzzing of the parsers of untrusted bytes: settings, guards and strategies.

Every parser of bytes someone else made (safetensors headers, GGUF headers, the index, gain
metadata, claim files, config.json, adapter_config.json, gainsurgery.json, Hub
listings and batch answers, training checkpoints, experiment records, JSON-lines
data) must turn any input into a result or a one-line
:class:`~gainsurgery.errors.GainSurgeryError`: never another exception, a hang or
unbounded memory. The ``tests/test_fuzz_*.py`` modules say so with hypothesis, using
the pieces here:

- :func:`fuzz_settings`: a bounded run for CI (a fixed number of examples per test,
  derandomized so CI is repeatable), or a deep one when ``GAINSURGERY_FUZZ_EXAMPLES``
  is set (that many examples per test, random seeds). Hypothesis keeps no database
  unless ``GAINSURGERY_FUZZ_DB`` names a folder for one: nothing is written into the
  repo or HOME.
- :func:`outcome`: runs one parser call under :func:`bounded` (an address-space
  limit above what the process already maps, and a watchdog that turns a hang into
  an exception, with ``faulthandler`` as a backstop for a hang in C code) and checks
  that an error is one printable line.
- Strategies that reach deep code: :func:`mutated` applies a few structured
  mutations to a *valid* JSON document (wrong types, extreme numbers, deep nesting,
  duplicate keys, odd unicode, deleted and added fields), :func:`json_text` renders
  it (sometimes truncated or with bytes changed), and :func:`safetensors_file`
  builds a file from a mutated header (offsets that overlap, leave holes or
  overflow; header lengths that lie) and a data buffer that may be cut short.
"""

from __future__ import annotations

import contextlib
import copy
import faulthandler
import json
import math
import os
import resource
import signal
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import numpy as np

from gainsurgery.errors import GainSurgeryError
from gainsurgery.io.safetensors import DTYPE_BITS

#: Examples per fuzz test in a deep run (unset: each test's own CI count).
EXAMPLES_ENV = "GAINSURGERY_FUZZ_EXAMPLES"
#: A folder for hypothesis' example database in deep runs (unset: no database).
DATABASE_ENV = "GAINSURGERY_FUZZ_DB"
#: Memory one parser call may map above what the process held before it, in bytes.
MEMORY_BUDGET = 512 << 20
#: Seconds one parser call may take before the watchdog calls it a hang (generous: a
#: loaded CI machine is slow, and the slowest legitimate input here takes well under 1 s).
WATCHDOG_SECONDS = 30.0


def _private_home() -> str:
    """A temporary folder of this process for what hypothesis stores besides its database (a cache of the
    constants it finds in the code under test): by default it would write ``.hypothesis/`` into the repo."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="gainsurgery-hypothesis-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


set_hypothesis_home_dir(_private_home())


def fuzz_settings(ci_examples: int) -> settings:
    """Hypothesis settings for one fuzz test: ``ci_examples`` in CI, ``$GAINSURGERY_FUZZ_EXAMPLES`` when set.

    No deadline (a loaded machine must not fail a test): hangs are :func:`bounded`'s job.
    """
    raw = os.environ.get(EXAMPLES_ENV)
    examples = int(raw) if raw else ci_examples
    db_dir = os.environ.get(DATABASE_ENV)
    if db_dir:
        from hypothesis.database import DirectoryBasedExampleDatabase

        database: Any = DirectoryBasedExampleDatabase(db_dir)
    else:
        database = None
    return settings(max_examples=examples, deadline=None, database=database, derandomize=not raw,
                    print_blob=True, report_multiple_bugs=bool(raw),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example,
                                           HealthCheck.function_scoped_fixture])


class Hang(BaseException):
    """Raised by the watchdog inside a call that ran past :data:`WATCHDOG_SECONDS`.

    A BaseException, so that no ``except Exception`` in the code under test can turn
    it into an ordinary error.
    """


def _mapped_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


@contextlib.contextmanager
def bounded(memory_bytes: int = MEMORY_BUDGET, seconds: float = WATCHDOG_SECONDS) -> Iterator[None]:
    """Run a block with at most ``memory_bytes`` more address space and ``seconds`` of wall time.

    Memory: ``RLIMIT_AS`` is lowered to what the process maps now plus the budget, so
    an allocation sized by a hostile number fails with ``MemoryError`` (a test failure)
    instead of taking the machine. Time: ``SIGALRM`` raises :class:`Hang` in Python
    code; a hang inside C code that never returns to Python is ended by
    ``faulthandler`` at three times the limit, which prints every thread's stack.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _mapped_bytes() + memory_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, soft)

    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds * 3, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, previous)


def check_one_line(exc: BaseException) -> str:
    """The message of ``exc``, asserted to be one non-empty printable line of bounded length."""
    msg = str(exc)
    assert msg.strip(), f"{type(exc).__name__} with an empty message"
    assert msg.isprintable(), f"{type(exc).__name__} message is not one printable line: {msg[:300]!r}"
    assert len(msg) <= 2000, f"{type(exc).__name__} message of {len(msg)} characters: {msg[:300]!r}..."
    return msg


def outcome(fn: Callable[..., Any], *args: Any, error: type[GainSurgeryError] | tuple = GainSurgeryError,
            memory_bytes: int = MEMORY_BUDGET, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` under :func:`bounded`: its result, or the ``error`` it raised (message checked).

    Any other exception propagates: hypothesis reports it (and shrinks the input).
    """
    label = getattr(fn, "__qualname__", repr(fn))
    with bounded(memory_bytes):
        try:
            result = fn(*args, **kwargs)
        except error as exc:
            check_one_line(exc)
            event(f"{label}: {type(exc).__name__}")
            return exc
    event(f"{label}: ok")
    return result


def failed(result: Any) -> bool:
    """True when :func:`outcome` gave an error rather than a result."""
    return isinstance(result, GainSurgeryError)


# --------------------------------------------------------------------------- JSON values


class Raw:
    """Text placed verbatim in rendered JSON: a number JSON cannot hold, ``NaN``, a deep nest."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:60]!r}{'...' if len(self.text) > 60 else ''})"


class Dup:
    """An object whose text holds the same key more than once (``pairs`` in order)."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.pairs = pairs

    def __repr__(self) -> str:
        return f"Dup({self.pairs!r})"


def render(value: Any) -> str:
    """JSON text of ``value``, with :class:`Raw` and :class:`Dup` spelled as they say (ASCII, escapes kept)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Dup):
        return "{" + ",".join(f"{json.dumps(k)}:{render(v)}" for k, v in value.pairs) + "}"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{render(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(render(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("1e999" if value > 0 else "-1e999")
    return json.dumps(value)


ODD_STRINGS = ["", " ", "\x00", "\n", "a\nb", "\r", "\u2028", "\u0085", "\x1b[31mred", "\ud800", "\udfff",
               "\ufeff", "é", "e\u0301", "😀", "../x", "/", ".", "..", "~", "C:\\x", "a/b", "NaN", "null",
               "model.layers.0.self_attn.o_proj.weight"]
EXTREME_INTS = [0, 1, -1, 2, 7, 8, 255, 256, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63,
                2**64 - 1, 2**64, -2**63, -2**64, 10**30, -(10**30)]
EXTREME_FLOATS = [0.0, -0.0, 0.5, 1.0, -1.0, 5e-324, 1e-310, 1.7976931348623157e308, -1.7976931348623157e308, 1e300]
RAW_TOKENS = ["1e999", "-1e999", "1e-999", "NaN", "Infinity", "-Infinity", "<digits>", "0x10",
              "01", "1.", ".5", "+1", "-", "tru", "nul", "\"\\ud800\"", "\"\\u0000\"", "\"\\x\"", "[", "{", "]",
              "}", ",", "\"unterminated"]
DEPTHS = [2, 9, 65, 257, 5000, 200_000]

# Long values are made by .map, so that a strategy's repr (printed in statistics) stays short.
long_strings = st.sampled_from([300, 5000, 100_000]).map(lambda n: "x" * n)
odd_strings = st.one_of(st.sampled_from(ODD_STRINGS), st.text(max_size=24), long_strings,
                        st.text(st.characters(codec="utf-8", categories=["Cc", "Cf", "Zl", "Zp", "Mn", "So"]),
                                max_size=8))
extreme_numbers = st.one_of(st.sampled_from(EXTREME_INTS), st.sampled_from(EXTREME_FLOATS),
                            st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False))


@st.composite
def deep_nest(draw: st.DrawFn) -> Raw:
    """A nest of ``[`` or ``{"k":`` some levels deep, closed or not."""
    depth = draw(st.sampled_from(DEPTHS))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"k":', "}")]))
    closed = draw(st.booleans())
    return Raw(opener * depth + "0" + (closer * depth if closed else ""))


def _raw(token: str) -> Raw:
    return Raw("9" * 5000 if token == "<digits>" else token)  # past Python's int-to-str digit limit


raw_tokens = st.sampled_from(RAW_TOKENS).map(_raw)
leaves = st.one_of(st.none(), st.booleans(), extreme_numbers, odd_strings, raw_tokens)
json_values = st.recursive(
    leaves, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(odd_strings, inner, max_size=4)),
    max_leaves=10)


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _get(value: Any, path: tuple) -> Any:
    for p in path:
        value = value[p]
    return value


def _set(root: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    _get(root, path[:-1])[path[-1]] = new
    return root


MUTATIONS = ["replace", "delete", "add", "duplicate", "nest", "number", "string", "retype", "deep"]


@st.composite
def mutated(draw: st.DrawFn, valid: Any, max_mutations: int = 3, keys: list[str] | None = None) -> Any:
    """``valid`` (a JSON-like value) after up to ``max_mutations`` structured mutations.

    Each mutation picks a place in the document and does one of :data:`MUTATIONS`:
    replace it with any value, delete it, add a field or item beside it, name a key
    twice, wrap it in nesting, make it an extreme number or an odd string, give it
    another JSON type, or replace it with a very deep nest. ``keys`` are field
    names worth adding (those the parser knows), besides odd ones.
    """
    value = copy.deepcopy(valid)
    for _ in range(draw(st.integers(0, max_mutations))):
        paths = [p for p in _paths(value)]
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(MUTATIONS))
        here = _get(value, path)
        if op == "replace":
            value = _set(value, path, draw(json_values))
        elif op == "delete" and path:
            parent = _get(value, path[:-1])
            del parent[path[-1]]
        elif op == "add":
            item = draw(json_values)
            if isinstance(here, dict):
                name = draw(st.sampled_from(keys) | odd_strings) if keys else draw(odd_strings)
                here[name] = item
            elif isinstance(here, list):
                here.insert(draw(st.integers(0, len(here))), item)
            else:
                value = _set(value, path, [here, item])
        elif op == "duplicate" and isinstance(here, dict) and here:
            pairs = list(here.items())
            k = draw(st.sampled_from([p[0] for p in pairs]))
            pairs.insert(draw(st.integers(0, len(pairs))), (k, draw(json_values)))
            value = _set(value, path, Dup(pairs))
        elif op == "nest":
            for _ in range(draw(st.integers(1, 12))):
                here = [here] if draw(st.booleans()) else {"k": here}
            value = _set(value, path, here)
        elif op == "number":
            value = _set(value, path, draw(extreme_numbers | st.sampled_from(RAW_TOKENS[:7]).map(_raw)))
        elif op == "string":
            value = _set(value, path, draw(odd_strings))
        elif op == "retype":
            other = draw(st.sampled_from([str(here)[:100], [here], {"v": here}, True, None, 0, 1.5]))
            value = _set(value, path, other)
        elif op == "deep":
            value = _set(value, path, draw(deep_nest()))
    return value


@st.composite
def corrupted(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` as it is (mostly), or cut short, with bytes changed, inserted or a BOM in front."""
    op = draw(st.sampled_from(["keep", "keep", "keep", "truncate", "flip", "insert", "bom", "latin1"]))
    if op == "keep" or not data and op in ("truncate", "flip"):
        return data
    if op == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if op == "flip":
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    if op == "insert":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(min_size=1, max_size=8)) + data[i:]
    if op == "bom":
        return b"\xef\xbb\xbf" + data
    return data.replace(b"e", b"\xe9")


@st.composite
def json_text(draw: st.DrawFn, valid: Any, max_mutations: int = 3, keys: list[str] | None = None) -> bytes:
    """The bytes of a mutated ``valid`` document, sometimes corrupted as text too; or any bytes at all."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=64))
    doc = draw(mutated(valid, max_mutations, keys))
    return draw(corrupted(render(doc).encode("utf-8", "surrogatepass")))


# --------------------------------------------------------------------------- safetensors


def header_for(tensors: list[tuple[str, str, list[int], bytes]], metadata: dict[str, str] | None = None
               ) -> tuple[dict[str, Any], bytes]:
    """A valid safetensors header (as a dict) and data buffer for ``(name, dtype, shape, bytes)`` tensors."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    data = b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return header, data


LENGTH_LIES = [0, 1, 7, 8, 2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, 100 * 1024 * 1024,
               100 * 1024 * 1024 + 1]


@st.composite
def offsets_shuffle(draw: st.DrawFn, header: Any) -> Any:
    """Offsets made to overlap, leave holes, run past the end or overflow, for one tensor of ``header``."""
    if not isinstance(header, dict):
        return header
    names = [k for k, v in header.items() if isinstance(v, dict) and isinstance(v.get("data_offsets"), list)]
    if not names:
        return header
    name = draw(st.sampled_from(names))
    ends = [o for v in header.values() if isinstance(v, dict) and isinstance(v.get("data_offsets"), list)
            for o in v["data_offsets"] if isinstance(o, int)]
    near = st.sampled_from(ends or [0]).flatmap(lambda e: st.sampled_from([e - 1, e, e + 1, e + 4]))
    anywhere = near | st.sampled_from(EXTREME_INTS)
    header = dict(header)
    header[name] = {**header[name], "data_offsets": [draw(anywhere), draw(anywhere)]}
    return header


@st.composite
def safetensors_file(draw: st.DrawFn, header: dict[str, Any], data: bytes, max_mutations: int = 3,
                     keys: list[str] | None = None) -> bytes:
    """The bytes of a safetensors file built from a mutated ``header`` and ``data``; sometimes raw bytes.

    The 8-byte length may lie (a little or absurdly), the header may be padded with
    spaces (legal) or other bytes, offsets may overlap or overflow, and the data may
    be cut short or run long.
    """
    if draw(st.integers(0, 24)) == 0:
        return draw(st.binary(max_size=96))
    doc = draw(mutated(header, max_mutations, keys))
    if draw(st.integers(0, 3)) == 0:
        doc = draw(offsets_shuffle(doc))
    text = draw(corrupted(render(doc).encode("utf-8", "surrogatepass")))
    text += draw(st.sampled_from([b"", b" " * draw(st.integers(1, 7)), b"\x00", b"\n"]))
    length = len(text)
    lie = draw(st.sampled_from(["none"] * 6 + ["delta", "absurd"]))
    if lie == "delta":
        length = max(0, length + draw(st.integers(-9, 9)))
    elif lie == "absurd":
        length = draw(st.sampled_from(LENGTH_LIES))
    body = draw(st.sampled_from(["keep"] * 5 + ["cut", "extend"]))
    if body == "cut" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif body == "extend":
        data = data + draw(st.binary(min_size=1, max_size=16))
    return struct.pack("<Q", length) + text + data


# --------------------------------------------------------------------------- a synthetic base


O_PROJ = "model.layers.{}.self_attn.o_proj.weight"
DOWN = "model.layers.{}.mlp.down_proj.weight"
BASE_TENSORS = [
    ("model.embed_tokens.weight", "F32", [8, 4]),
    (O_PROJ.format(0), "BF16", [4, 4]),
    (DOWN.format(0), "F16", [4, 6]),
    (O_PROJ.format(1), "BF16", [4, 4]),
    (DOWN.format(1), "F32", [4, 6]),
    ("model.norm.weight", "F32", [4]),
]
SHARDS = {"model-00001-of-00002.safetensors": BASE_TENSORS[:3], "model-00002-of-00002.safetensors": BASE_TENSORS[3:]}
CONFIG = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 4, "intermediate_size": 6,
          "torch_dtype": "bfloat16", "text_config": {"model_type": "llama", "num_hidden_layers": 2}}


def _tensor_bytes(dtype: str, shape: list[int], rng: np.random.Generator) -> bytes:
    n = int(np.prod(shape)) * DTYPE_BITS[dtype] // 8
    # Values near 1 in every float dtype (bf16 is the top half of an f32): no saturation on apply.
    if dtype == "F32":
        return rng.uniform(0.5, 1.5, n // 4).astype("<f4").tobytes()
    if dtype == "F16":
        return rng.uniform(0.5, 1.5, n // 2).astype("<f2").tobytes()
    if dtype == "BF16":
        return (rng.uniform(0.5, 1.5, n // 2).astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def shard_parts(tensors, seed: int = 0, metadata: dict | None = None) -> tuple[dict, bytes]:
    """Header (a dict) and data of a shard holding ``(name, dtype, shape)`` tensors of values near 1."""
    rng = np.random.default_rng(seed)
    return header_for([(n, d, s, _tensor_bytes(d, s, rng)) for n, d, s in tensors],
                      {"format": "pt"} if metadata is None else metadata)


def safetensors_bytes(header: Any, data: bytes) -> bytes:
    """A safetensors file: the 8-byte length of the rendered ``header``, the header, ``data``."""
    text = render(header).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(text)) + text + data


def index_doc() -> dict:
    """The index of :data:`SHARDS`."""
    return {"metadata": {"total_size": 1234},
            "weight_map": {n: shard for shard, ts in SHARDS.items() for n, _, _ in ts}}


def base_files(*, index: bytes | None = None, config: bytes | None = None,
               shard: tuple[str, bytes] | None = None) -> dict[str, bytes]:
    """The files of a two-shard llama-shaped checkpoint; ``index``/``config``/``shard`` replace a file's bytes."""
    files = {name: safetensors_bytes(*shard_parts(tensors, seed=i)) for i, (name, tensors) in enumerate(SHARDS.items())}
    if shard is not None:
        files[shard[0]] = shard[1]
    files["model.safetensors.index.json"] = index if index is not None else json.dumps(index_doc()).encode()
    files["config.json"] = config if config is not None else json.dumps(CONFIG).encode()
    files["tokenizer_config.json"] = b"{}"
    return files


def make_base(folder: Path, **replace: Any) -> Path:
    """:func:`base_files` written into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in base_files(**replace).items():
        write(folder / name, data)
    return folder


def write(path: os.PathLike | str, data: bytes) -> None:
    """Write ``data`` to ``path`` (replacing it)."""
    with open(path, "wb") as f:
        f.write(data)


