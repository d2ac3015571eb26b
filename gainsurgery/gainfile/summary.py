"""Statistics of a gain file, for ``inspect`` and model cards: overall, per tensor, per layer."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gainsurgery.errors import GainFileError
from gainsurgery.gainfile.format_v1 import GainFile, first_line, natural_key
from gainsurgery.gainfile.provenance import base_provenance


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
    """Statistics of a gain file: overall, per target tensor and per layer, and how many of its
    tensors its base fingerprints cover (``base_coverage``: ``tensors``, ``uncovered``)."""
    per_target = {k: {"dim": gain.dims[k], **summarize(gain.vectors[k])} for k in sorted(gain.vectors, key=natural_key)}
    per_layer = {
        layer: summarize(np.concatenate([gain.vectors[k] for k in keys]))
        for layer, keys in gain.scaled_keys_by_layer().items()
    }
    overall = summarize(np.concatenate([gain.vectors[k] for k in sorted(gain.vectors)]))
    try:
        covered = base_provenance(gain, "gain file")
        coverage: dict[str, Any] = {"tensors": covered.total, "uncovered": len(covered.uncovered)}
    except GainFileError as exc:  # shown, not refused: inspect is how one looks at a damaged file
        coverage = {"tensors": len(gain.vectors), "uncovered": len(gain.vectors), "problem": first_line(exc)}
    return {
        "parameters": gain.num_parameters,
        "tensors": len(gain.vectors),
        "overall": overall,
        "per_layer": per_layer,
        "per_target": per_target,
        "metadata": gain.metadata,
        "base_coverage": coverage,
    }


def format_count(n: int) -> str:
    """Human-readable parameter count: 46080 -> '46.1K'."""
    if n < 1000:
        return str(n)
    exp = min(int(math.log10(n) // 3), 3)
    return f"{n / 10 ** (3 * exp):.1f}{' KMB'[exp]}"
