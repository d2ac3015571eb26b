"""Gain files: load, save, stack, invert, raise to a power, inspect."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from gainsurgery import gainfile as gf
from gainsurgery.extras import require_extra
from gainsurgery.gainfile import GainFile
from gainsurgery.io.atomic import atomic_file
from gainsurgery.io.hashing import sha256_file


def load_gain(path: str | os.PathLike[str], *, allow_negative: bool = False) -> GainFile:
    """Load and validate a gain file (format v1).

    Args:
        path: the ``.safetensors`` gain file.
        allow_negative: accept negative gains (sign flips); refused by default.

    Returns:
        The :class:`~gainsurgery.gainfile.GainFile`: ``vectors``, ``dims``, ``metadata``.

    Raises:
        GainFileError: missing, not a gain file, or holding NaN, infinite, zero or negative gains.

    Example:
        >>> g = load_gain("legal.safetensors")  # doctest: +SKIP
        >>> g.num_parameters, g.metadata["method"]  # doctest: +SKIP
        (55296, 'gain-ffn')
    """
    return gf.load(path, allow_negative=allow_negative)


def save_gain(gain: GainFile, path: str | os.PathLike[str]) -> Path:
    """Write ``gain`` as a v1 gain file, atomically (temp file, fsync, rename).

    Returns:
        The path written.

    Raises:
        GainFileError: the gain breaks the format (e.g. non-float32 vectors), or the folder is missing.

    Example:
        >>> save_gain(g, "copy.safetensors")  # doctest: +SKIP
        PosixPath('copy.safetensors')
    """
    return gain.save(path)


def _load_each(gains: Sequence[GainFile | str | os.PathLike[str]], allow_negative: bool
               ) -> list[tuple[GainFile, str, str | None]]:
    """(gain, name, path or None) for each gain object or path."""
    out = []
    for i, g in enumerate(gains):
        if isinstance(g, GainFile):
            out.append((g, f"gain[{i}]", None))
        else:
            out.append((gf.load(g, allow_negative=allow_negative), Path(g).name, str(g)))
    return out


def stack_gains(gains: Sequence[GainFile | str | os.PathLike[str]], *, allow_negative: bool = False,
                description: str | None = None, allow_base_mismatch: bool = False) -> GainFile:
    """Compose gains into one: the float32 product on shared tensors, the union otherwise.

    Applying the result once equals applying the product of the vectors, rounded
    once per tensor (not once per file).

    Args:
        gains: gain files (paths) or :class:`GainFile` objects, in order.
        allow_negative: accept negative gains in the inputs.
        description: free text stored in the metadata.
        allow_base_mismatch: stack gains whose base fingerprints say they were trained
            on different bases (refused by default).

    Returns:
        The stacked gain; ``metadata["parents"]`` names each input (with its sha256 for
        files) and keeps each parent's base fingerprint.

    Raises:
        GainFileError: a tensor is scaled along different dims, an input is invalid, or
            the inputs were trained on different bases.

    Example:
        >>> both = stack_gains(["legal.safetensors", "medical.safetensors"])  # doctest: +SKIP
        >>> save_gain(both, "both.safetensors")  # doctest: +SKIP
    """
    loaded = _load_each(gains, allow_negative)
    stacked = gf.stack([g for g, _, _ in loaded], [name for _, name, _ in loaded],
                       allow_base_mismatch=allow_base_mismatch)
    for parent, (_, _, path) in zip(stacked.metadata["parents"], loaded):
        if path is not None:
            parent["sha256"] = sha256_file(path)
    if description:
        stacked.metadata["description"] = description
    return stacked


def invert_gain(gain: GainFile | str | os.PathLike[str]) -> GainFile:
    """The inverse gain (1/s in float32), which undoes ``gain`` up to rounding.

    Args:
        gain: a gain file (path) or a :class:`GainFile`.

    Returns:
        The inverse; for a file, ``metadata["parents"]`` records its name and sha256.

    Raises:
        GainFileError: the inverse overflows float32 (gains too close to zero).

    Example:
        >>> save_gain(invert_gain("legal.safetensors"), "undo-legal.safetensors")  # doctest: +SKIP
    """
    (g, name, path), = _load_each([gain], allow_negative=True)
    inv = gf.invert(g)
    if path is not None:
        inv.metadata["parents"] = [{"name": name, "sha256": sha256_file(path), "op": "invert"}]
    return inv


def power_gain(gain: GainFile | str | os.PathLike[str], alpha: float) -> GainFile:
    """The gain s^α: the same adaptation, weaker (0 < α < 1) or stronger (α > 1), without retraining.

    Args:
        gain: a gain file (path) or a :class:`GainFile`.
        alpha: the power; 0 gives the identity, 1 the gain itself, −1 its inverse.

    Returns:
        s^α in float32; for a file, ``metadata["parents"]`` records its name, sha256 and the power.

    Raises:
        GainFileError: α not finite, a non-integer α on negative gains, or a float32 overflow.

    Example:
        >>> save_gain(power_gain("legal.safetensors", 0.5), "legal-half.safetensors")  # doctest: +SKIP
    """
    (g, name, path), = _load_each([gain], allow_negative=True)
    out = gf.power(g, alpha)
    if path is not None:
        out.metadata["parents"] = [{"name": name, "sha256": sha256_file(path), "op": "power", "power": float(alpha)}]
    return out


def inspect_gain(gain: GainFile | str | os.PathLike[str], *, plot: str | os.PathLike[str] | None = None
                 ) -> dict[str, Any]:
    """Statistics of a gain: parameter count, min/max/mean/std and the share above 1, overall,
    per target tensor and per layer, plus its metadata.

    Args:
        gain: a gain file (path) or a :class:`GainFile`.
        plot: also draw per-layer distributions into this PNG (needs the ``plots`` extra);
            written whole or not at all, never over the gain file.

    Returns:
        ``{"parameters", "tensors", "overall", "per_layer", "per_target", "metadata", "base_coverage"}``
        (``base_coverage``: how many of its tensors no base fingerprint covers).

    Example:
        >>> inspect_gain("legal.safetensors")["overall"]["mean"]  # doctest: +SKIP
        1.0031
    """
    (g, name, path), = _load_each([gain], allow_negative=True)
    if plot is not None:
        require_extra("plots", "inspect_gain(plot=...)")
        from gainsurgery.plots import plot_gain_distributions  # matplotlib: only when a plot is asked for

        with atomic_file(plot, inputs=[path], what="plot file") as f:
            plot_gain_distributions(g, f, title=name)
    return gf.stats(g)
