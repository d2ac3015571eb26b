"""The gain file: format version 1 (see docs/gain-format.md, normative).

A gain file is a safetensors file whose tensors are 1-D float32 vectors, one per
adapted base tensor, keyed by that tensor's exact name in the base checkpoint.
``__metadata__`` holds ``format = "gainsurgery.gain/1"`` and ``dims``, a JSON
object mapping each key to the dim of the base tensor the vector runs along.

This module loads, validates, saves, stacks and inverts gain files. It needs only
numpy and safetensors, so the apply path never imports torch.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from gainsurgery.io.atomic import write_bytes
from gainsurgery.io.hashing import sha256_file
from gainsurgery.errors import GainFileError

FORMAT = "gainsurgery.gain/1"

#: Optional metadata keys whose values are JSON-encoded structures.
JSON_METADATA = ("parents", "training")
#: Optional metadata keys whose values are plain strings.
TEXT_METADATA = ("method", "side", "base_model", "base_fingerprint", "description")


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
                raise GainFileError(f"{source}: dim for {key!r} must be a non-negative integer, got {dim!r}")
            if vec.ndim != 1 or vec.size == 0:
                raise GainFileError(f"{source}: {key!r} must be a non-empty 1-D vector, got shape {vec.shape}")
            if vec.dtype != np.float32:
                raise GainFileError(f"{source}: {key!r} must be float32, got {vec.dtype}")
            check_values(vec, key, allow_negative=allow_negative, source=source)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the file atomically (temp file + rename) and return its path."""
        from safetensors.numpy import save

        self.validate(allow_negative=True)
        meta = {"format": FORMAT, "dims": json.dumps(self.dims, sort_keys=True)}
        for key, value in self.metadata.items():
            if value is None:
                continue
            meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        data = save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.vectors.items()}, metadata=meta)
        return write_bytes(Path(path), data, GainFileError)

    def scaled_keys_by_layer(self) -> dict[str, list[str]]:
        """Group keys by their layer label (see :func:`layer_label`)."""
        groups: dict[str, list[str]] = {}
        for key in sorted(self.vectors, key=natural_key):
            groups.setdefault(layer_label(key), []).append(key)
        return groups


def check_values(vec: np.ndarray, key: str, *, allow_negative: bool, source: str = "gain file") -> None:
    """Refuse non-finite, zero and (unless allowed) negative gain values."""
    if not np.all(np.isfinite(vec)):
        raise GainFileError(f"{source}: {key!r} holds NaN or infinite gains")
    if np.any(vec == 0):
        raise GainFileError(f"{source}: {key!r} holds zero gains (they would erase weights irreversibly)")
    if not allow_negative and np.any(vec < 0):
        raise GainFileError(
            f"{source}: {key!r} holds negative gains; pass --allow-negative if that is intended"
        )


def load(path: str | os.PathLike[str], *, allow_negative: bool = False) -> GainFile:
    """Load and validate a v1 gain file.

    Raises:
        GainFileError: the file is missing, not safetensors, lacks v1 metadata, or
            holds invalid vectors.

    Example:
        >>> g = load("gain.safetensors")  # doctest: +SKIP
        >>> g.metadata.get("method")  # doctest: +SKIP
        'gain-ffn'
    """
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise GainFileError(f"gain file not found: {p}")
    try:
        with safe_open(str(p), framework="np") as f:
            raw_meta = f.metadata() or {}
            keys = list(f.keys())
            vectors = {k: f.get_tensor(k) for k in keys}
    except GainFileError:
        raise
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise GainFileError(f"{p}: not a readable safetensors file ({first_line(exc)})") from None
    if raw_meta.get("format") != FORMAT:
        raise GainFileError(
            f"{p}: not a gain file (metadata 'format' is {raw_meta.get('format')!r}, expected {FORMAT!r})"
        )
    try:
        dims = json.loads(raw_meta["dims"])
    except (KeyError, json.JSONDecodeError):
        raise GainFileError(f"{p}: metadata 'dims' is missing or not JSON") from None
    if not isinstance(dims, dict):
        raise GainFileError(f"{p}: metadata 'dims' must be a JSON object")
    metadata: dict[str, Any] = {}
    for key, value in sorted(raw_meta.items()):  # safetensors hands metadata over in no fixed order
        if key in ("format", "dims"):
            continue
        if key in JSON_METADATA:
            try:
                metadata[key] = json.loads(value)
            except json.JSONDecodeError:
                metadata[key] = value
        else:
            metadata[key] = value
    gain = GainFile(vectors, dims, metadata)
    gain.validate(allow_negative=allow_negative, source=str(p))
    return gain


def load_many(paths: Iterable[str | os.PathLike[str]], *, allow_negative: bool = False
              ) -> tuple[GainFile, list[dict[str, Any]]]:
    """Load gain files, stack them (in order) and describe each for provenance.

    Returns:
        (stacked gain, one :func:`describe` dict per file).
    """
    paths = [str(p) for p in paths]
    gains = [load(p, allow_negative=allow_negative) for p in paths]
    sources = [describe(g, Path(p).name, p) for p, g in zip(paths, gains)]
    stacked = gains[0] if len(gains) == 1 else stack(gains, [Path(p).name for p in paths])
    return stacked, sources


def describe(gain: GainFile, name: str, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What provenance records about one gain: name, path and sha256 (for a file), method, side,
    base_model and parameter count."""
    entry: dict[str, Any] = {"name": name}
    if path is not None:
        entry.update(path=str(Path(path).resolve()), sha256=sha256_file(path))
    entry.update(method=gain.metadata.get("method"), side=gain.metadata.get("side"),
                 base_model=gain.metadata.get("base_model"), parameters=gain.num_parameters)
    return entry


def stack(gains: Iterable[GainFile], names: Iterable[str] | None = None) -> GainFile:
    """Compose gain files: product on shared (key, dim), union otherwise.

    Products are taken in float32, in the order given. ``names`` (one per gain,
    e.g. file names) are recorded with each parent's sha-free summary in the
    ``parents`` metadata for provenance.

    Raises:
        GainFileError: two files scale the same key along different dims (the
            product is not a diagonal gain).
    """
    gains = list(gains)
    if not gains:
        raise GainFileError("nothing to stack: give at least one gain file")
    names = list(names) if names is not None else [f"gain[{i}]" for i in range(len(gains))]
    vectors: dict[str, np.ndarray] = {}
    dims: dict[str, int] = {}
    for gain, name in zip(gains, names):
        for key, vec in gain.vectors.items():
            dim = gain.dims[key]
            if key not in vectors:
                vectors[key] = vec.astype(np.float32, copy=True)
                dims[key] = dim
                continue
            if dims[key] != dim:
                raise GainFileError(
                    f"{name}: {key!r} is scaled along dim {dim} but an earlier file scales it along dim {dims[key]}"
                )
            if vectors[key].shape != vec.shape:
                raise GainFileError(
                    f"{name}: {key!r} has length {vec.size} but an earlier file has {vectors[key].size}"
                )
            vectors[key] = np.multiply(vectors[key], vec, dtype=np.float32)
    parents = [
        {"name": name, "method": g.metadata.get("method"), "side": g.metadata.get("side"),
         "parameters": g.num_parameters, **({"parents": g.metadata["parents"]} if "parents" in g.metadata else {})}
        for g, name in zip(gains, names)
    ]
    metadata: dict[str, Any] = {"parents": parents}
    for key in ("method", "side", "base_model"):
        values = {g.metadata.get(key) for g in gains}
        if len(values) == 1 and None not in values:
            metadata[key] = values.pop()
    return GainFile(vectors, dims, metadata)


def invert(gain: GainFile) -> GainFile:
    """Return the gain whose product with ``gain`` is the identity (1/s in float32).

    Note that applying s then 1/s restores a bf16 checkpoint only up to rounding:
    each apply rounds once to the tensor's dtype.
    """
    for key, vec in gain.vectors.items():
        check_values(vec, key, allow_negative=True)
    with np.errstate(over="ignore"):  # overflow is reported below, per key
        vectors = {k: np.divide(np.float32(1.0), v, dtype=np.float32) for k, v in gain.vectors.items()}
    for key, vec in vectors.items():
        if not np.all(np.isfinite(vec)):
            raise GainFileError(f"{key!r}: inverse overflows float32 (gains too close to zero)")
    metadata = dict(gain.metadata)
    metadata["description"] = "inverse of " + gain.metadata.get("description", "a gain file")
    return GainFile(vectors, dict(gain.dims), metadata)


def identity(targets: Mapping[str, tuple[int, int]], metadata: Mapping[str, Any] | None = None) -> GainFile:
    """A gain file of ones: ``targets`` maps tensor name -> (dim, length)."""
    vectors = {k: np.ones(n, dtype=np.float32) for k, (_, n) in targets.items()}
    dims = {k: d for k, (d, _) in targets.items()}
    return GainFile(vectors, dims, dict(metadata or {}))


def summarize(values: np.ndarray) -> dict[str, float]:
    """min/max/mean/std and the fraction of gains above 1 for a float32 array."""
    v = values.astype(np.float64)
    return {
        "count": int(v.size),
        "min": float(v.min()),
        "max": float(v.max()),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "frac_gt_1": float(np.mean(v > 1.0)),
    }


def stats(gain: GainFile) -> dict[str, Any]:
    """Statistics of a gain file: overall, per target tensor and per layer."""
    per_target = {k: {"dim": gain.dims[k], **summarize(gain.vectors[k])} for k in sorted(gain.vectors, key=natural_key)}
    per_layer = {
        layer: summarize(np.concatenate([gain.vectors[k] for k in keys]))
        for layer, keys in gain.scaled_keys_by_layer().items()
    }
    overall = summarize(np.concatenate([gain.vectors[k] for k in sorted(gain.vectors)]))
    return {
        "parameters": gain.num_parameters,
        "tensors": len(gain.vectors),
        "overall": overall,
        "per_layer": per_layer,
        "per_target": per_target,
        "metadata": gain.metadata,
    }


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


def format_count(n: int) -> str:
    """Human-readable parameter count: 46080 -> '46.1K'."""
    if n < 1000:
        return str(n)
    exp = min(int(math.log10(n) // 3), 3)
    return f"{n / 10 ** (3 * exp):.1f}{' KMB'[exp]}"
