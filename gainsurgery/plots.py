"""Plots of gain vectors (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

from gainsurgery.gainfile import GainFile, natural_key


def plot_gain_distributions(gain: GainFile, path: str | Path | BinaryIO, title: str = "") -> str | Path | BinaryIO:
    """Box plots of the gains per layer, one panel per target kind; writes a PNG to ``path`` (a file or
    a binary file object, e.g. :func:`gainsurgery.io.atomic.atomic_file`'s) and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds: dict[str, dict[str, list[np.ndarray]]] = {}
    for key in sorted(gain.vectors, key=natural_key):
        layer = next((p for p in key.split(".") if p.isdigit()), "-")
        kind = key.rsplit(".", 2)[-2] if key.count(".") >= 2 else key
        kinds.setdefault(kind, {}).setdefault(layer, []).append(gain.vectors[key])
    fig, axes = plt.subplots(len(kinds), 1, figsize=(max(6, 0.35 * max(len(v) for v in kinds.values()) + 2),
                                                     2.6 * len(kinds)), squeeze=False)
    for ax, (kind, layers) in zip(axes[:, 0], kinds.items()):
        labels = list(layers)
        data = [np.concatenate(v) for v in layers.values()]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_ylabel("gain")
        ax.set_title(f"{kind}", fontsize=9)
    axes[-1, 0].set_xlabel("layer")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path
