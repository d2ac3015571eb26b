"""The gain file: format version 1 (see docs/gain-format.md, normative).

A gain file is a safetensors file whose tensors are 1-D float32 vectors, one per
adapted base tensor, keyed by that tensor's exact name in the base checkpoint.
``__metadata__`` holds ``format = "gainsurgery.gain/1"`` and ``dims``, a JSON
object mapping each key to the dim of the base tensor the vector runs along.

This module is the format itself: :class:`GainFile` (validate, save), :func:`load`
with every check a hostile file needs, and the metadata decoding. The operations on
gain files are beside it in this package (:mod:`.algebra`, :mod:`.provenance`,
:mod:`.summary`). It needs only numpy and safetensors, so the apply path never
imports torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from gainsurgery.errors import GainFileError, OutputError
from gainsurgery.io import jsonsafe
from gainsurgery.io.atomic import write_file
from gainsurgery.io.fingerprint import is_fingerprint
from gainsurgery.io.inputs import open_regular, show_name, show_path
from gainsurgery.io.safetensors import parse_header

FORMAT = "gainsurgery.gain/1"

#: Optional metadata keys whose values are JSON-encoded structures.
JSON_METADATA = ("parents", "training")
#: The optional key holding the content fingerprint of the base tensors the gain targets
#: (see :mod:`gainsurgery.io.fingerprint`).
BASE_TENSORS_KEY = "base_tensors_sha256"
#: Optional metadata keys whose values are plain strings.
TEXT_METADATA = ("method", "side", "base_model", "base_fingerprint", BASE_TENSORS_KEY, "description")
#: A gain file holds one float32 per channel of the adapted weights: a few million at most.
#: Larger files are refused before anything is read into memory, in bytes.
MAX_GAIN_FILE_BYTES = 1 << 30


@dataclass
class GainFile:
    """A set of gain vectors plus their metadata.

    Attributes:
        vectors: tensor name in the base checkpoint -> 1-D float32 vector.
        dims: tensor name -> dim of the base tensor the vector runs along.
        metadata: optional metadata (``method``, ``side``, ``base_model``,
            ``base_fingerprint``, ``parents``, ``training``, ``description``),
            decoded: structured values are Python objects, not JSON strings.

    Example:
        >>> g = GainFile({"h.0.attn.c_proj.weight": np.ones(8, np.float32)},
        ...              {"h.0.attn.c_proj.weight": 0}, {"method": "gain"})
        >>> g.num_parameters
        8
    """

    vectors: dict[str, np.ndarray]
    dims: dict[str, int]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        """Total number of gain values across all vectors."""
        return int(sum(v.size for v in self.vectors.values()))

    def validate(self, *, allow_negative: bool = False, source: str = "gain file") -> None:
        """Check the in-memory invariants of format v1; raise GainFileError if broken.

        Vectors must be 1-D float32, non-empty, finite and non-zero; negative values
        are refused unless ``allow_negative``. ``dims`` must name exactly the keys.
        """
        if not self.vectors:
            raise GainFileError(f"{source}: holds no gain vectors")
        if set(self.vectors) != set(self.dims):
            missing = sorted(set(self.vectors) ^ set(self.dims))
            raise GainFileError(
                f"{source}: 'dims' metadata and tensors disagree on keys ({missing[:3]}...)"
            )
        for key, vec in self.vectors.items():
            dim = self.dims[key]
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
                raise GainFileError(f"{source}: dim for {show_name(key)} must be a non-negative integer, "
                                    f"got {show_name(dim)}")
            if vec.ndim != 1 or vec.size == 0:
                raise GainFileError(f"{source}: {show_name(key)} must be a non-empty 1-D vector, got shape {vec.shape}")
            if vec.dtype != np.float32:
                raise GainFileError(f"{source}: {show_name(key)} must be float32, got {vec.dtype}")
            check_values(vec, key, allow_negative=allow_negative, source=source)

    def save(self, path: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str] | None] = ()) -> Path:
        """Write the file atomically (temp file, fsync, rename) and return its path.

        ``path`` is checked first (:func:`gainsurgery.io.checks.check_output`): it is
        never, never contains and never lies inside any of ``inputs`` (the files and
        folders the command read), and never an existing folder.
        """
        from safetensors.numpy import save

        self.validate(allow_negative=True)
        meta = {"format": FORMAT, "dims": json.dumps(self.dims, sort_keys=True)}
        for key, value in self.metadata.items():
            if value is None:
                continue
            meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        data = save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.vectors.items()}, metadata=meta)
        return write_file(path, data, inputs=inputs, what="output file", error=OutputError)

    def scaled_keys_by_layer(self) -> dict[str, list[str]]:
        """Group keys by their layer label (see :func:`layer_label`)."""
        groups: dict[str, list[str]] = {}
        for key in sorted(self.vectors, key=natural_key):
            groups.setdefault(layer_label(key), []).append(key)
        return groups


def check_values(vec: np.ndarray, key: str, *, allow_negative: bool, source: str = "gain file") -> None:
    """Refuse non-finite, zero and (unless allowed) negative gain values."""
    if not np.all(np.isfinite(vec)):
        raise GainFileError(f"{source}: {show_name(key)} holds NaN or infinite gains")
    if np.any(vec == 0):
        raise GainFileError(f"{source}: {show_name(key)} holds zero gains (they would erase weights irreversibly)")
    if not allow_negative and np.any(vec < 0):
        raise GainFileError(
            f"{source}: {show_name(key)} holds negative gains; pass --allow-negative if that is intended"
        )


def load(path: str | os.PathLike[str], *, allow_negative: bool = False) -> GainFile:
    """Load and validate a v1 gain file.

    The file is opened without blocking (a FIFO or device is refused) and its
    header is held to safetensors' rules (:func:`gainsurgery.io.safetensors.parse_header`:
    no duplicate keys, contiguous tensors); every JSON metadata value is parsed
    within limits (:mod:`gainsurgery.io.jsonsafe`). Only 1-D float32 tensors are read.

    Raises:
        GainFileError: the file is missing, not safetensors, lacks v1 metadata, or
            holds invalid vectors or metadata.

    Example:
        >>> g = load("gain.safetensors")  # doctest: +SKIP
        >>> g.metadata.get("method")  # doctest: +SKIP
        'gain-ffn'
    """
    shown = show_path(path)
    if not os.path.lexists(path):
        raise GainFileError(f"gain file not found: {shown}")
    with open_regular(path, error=GainFileError) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_GAIN_FILE_BYTES:
            raise GainFileError(f"{shown}: {size} bytes, more than a gain file can hold "
                                f"({MAX_GAIN_FILE_BYTES} bytes); not a gain file?")
        _, tensors, raw_meta = parse_header(f, size, shown, error=GainFileError)
        if raw_meta.get("format") != FORMAT:
            found = raw_meta.get("format")
            raise GainFileError(f"{shown}: not a gain file (metadata 'format' is "
                                f"{found[:60] if found is not None else None!r}, expected {FORMAT!r})")
        vectors: dict[str, np.ndarray] = {}
        for key, info in tensors.items():
            if info.dtype != "F32" or len(info.shape) != 1:
                raise GainFileError(f"{shown}: {show_path(key)} must be a 1-D float32 vector, got "
                                    f"{info.dtype} of shape {list(info.shape)}")
            f.seek(info.start)
            raw = bytearray(info.nbytes)
            if f.readinto(raw) != info.nbytes:
                raise GainFileError(f"{shown}: ended early while reading {show_path(key)} (modified?)")
            vectors[key] = np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False)
    metadata = decode_metadata(raw_meta, shown)
    dims = metadata.pop("dims")
    gain = GainFile(vectors, dims, metadata)
    gain.validate(allow_negative=allow_negative, source=shown)
    return gain


def decode_metadata(raw_meta: Mapping[str, str], where: str) -> dict[str, Any]:
    """Decode a gain file's ``__metadata__`` (strings): ``dims``, the JSON keys, the fingerprint.

    Every JSON value is parsed within limits and type-checked; structured keys must
    hold what the format says (``dims`` an object of integers, ``parents`` a list of
    objects, ``training`` an object), and ``base_tensors_sha256`` must read
    ``sha256:`` + 64 hex. Returns the metadata with ``dims`` (and the JSON keys)
    decoded, in a fixed (sorted) order.

    Raises:
        GainFileError: one line naming the file and the key.

    Example:
        >>> decode_metadata({"format": FORMAT, "dims": '{"w": 1}', "training": '{"steps": 3}'}, "g")
        {'dims': {'w': 1}, 'training': {'steps': 3}}
    """
    if "dims" not in raw_meta:
        raise GainFileError(f"{where}: metadata 'dims' is missing")
    dims = jsonsafe.expect_object(
        jsonsafe.loads(raw_meta["dims"], where=f"{where}: metadata 'dims'", error=GainFileError, max_depth=4),
        where=f"{where}: metadata 'dims'", error=GainFileError)
    out: dict[str, Any] = {"dims": dims}
    for key, value in sorted(raw_meta.items()):  # safetensors hands metadata over in no fixed order
        if key in ("format", "dims"):
            continue
        label = f"{where}: metadata {show_name(key)}"
        if key in JSON_METADATA:
            parsed = jsonsafe.loads(value, where=label, error=GainFileError)
            if key == "parents":
                for i, item in enumerate(_expect_list(parsed, label)):
                    jsonsafe.expect_object(item, where=label, field=f"[{i}]", error=GainFileError)
            else:
                jsonsafe.expect_object(parsed, where=label, error=GainFileError)
            out[key] = parsed
        elif key == BASE_TENSORS_KEY and not is_fingerprint(value):
            raise GainFileError(f"{label} must read sha256:<64 hex digits>")
        else:
            out[key] = value
    return out


def _expect_list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise GainFileError(f"{where}: expected array, got {jsonsafe.type_name(value)}")
    return value


def layer_label(key: str) -> str:
    """The layer a tensor belongs to, e.g. ``layer 3`` for ``model.layers.3.mlp...``.

    The label is the first integer path component; tensors without one are ``other``.
    """
    for part in key.split("."):
        if part.isdigit():
            return f"layer {int(part)}"
    return "other"


def natural_key(name: str) -> tuple:
    """Sort key that orders ``layers.10`` after ``layers.9``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def first_line(exc: BaseException) -> str:
    """First line of an exception message, for one-line error reports."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
