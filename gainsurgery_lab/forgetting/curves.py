"""The matched curve: how much more one method forgets than another, at every in-domain change both reach.

A method's **front** is one point per learning rate: the mean over the seeds run at
that lr of its in-domain change (x) and of a forgetting metric (y), each with the
documents' bootstrap replicates and a t-term for the seeds
(:func:`~gainsurgery_lab.forgetting.stats.seed_mean_estimate`). The front is used up
to its lr of best mean in-domain change (past it, a larger lr only adapts less and
forgets more).

For a pair of methods A and B and a metric, the **matched curve** is
D(x) = y_A(x) − y_B(x), both fronts read by linear interpolation at the same
in-domain change x, over the whole range of x that both fronts cover (nothing is
extrapolated). Each bootstrap replicate interpolates its own fronts (documents drawn
once and shared by every run, so D stays paired over documents; the seed terms are
drawn per method). Where D's 95% band lies below 0, A forgets less there; above 0, B
does; a band that holds 0 means the two cannot be told apart at that x. The
**verdict** lists those stretches of x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gainsurgery_lab.forgetting.methods import METHODS
from gainsurgery_lab.forgetting.stats import Estimate, efficient_prefix, interpolate_estimate, seed_mean_estimate
from gainsurgery.io.atomic import atomic_file

#: ``res`` below is a :class:`gainsurgery_lab.forgetting.analysis.Results` (which imports this module).
Results = Any

#: The forgetting metrics a curve is drawn for (key, label).
CURVE_METRICS = (("earlier_vs_base", "earlier vs base"), ("earlier_vs_own", "earlier vs own stage"),
                 ("untrained", "never-trained"))
#: Points along the shared range of in-domain change.
CURVE_POINTS = 41


@dataclass(frozen=True)
class FrontPoint:
    """One lr of a front: its seeds' mean in-domain change and forgetting metrics (with replicates)."""

    e: int
    seeds: tuple[int, ...]
    x: Estimate
    ys: dict[str, Estimate]


def method_seed(method: str) -> int:
    """A fixed seed per method for the seed level of the bootstrap (methods draw independently)."""
    import zlib

    return zlib.crc32(method.encode())


def front_points(res: Results, method: str) -> list[FrontPoint]:
    """``method``'s front over every seed run at each lr, up to its lr of best mean in-domain change."""
    variant = METHODS[method].default_variant
    by_lr: dict[int, list] = {}
    for r in res.runs:
        if r.method == method and r.variant == variant and not r.failed and r.metrics:
            by_lr.setdefault(r.e, []).append(r)
    points = []
    for e in sorted(by_lr):
        runs = sorted(by_lr[e], key=lambda r: r.seed)
        seed = method_seed(method)
        x = seed_mean_estimate([r.metrics["in_domain"] for r in runs], seed=seed)
        ys = {key: seed_mean_estimate([r.metrics[key] for r in runs], seed=seed)
              for key, _ in CURVE_METRICS if all(key in r.metrics for r in runs)}
        points.append(FrontPoint(e, tuple(r.seed for r in runs), x, ys))
    return points[:efficient_prefix([p.x.point for p in points])]


def matched_curve(res: Results, a: str, b: str, key: str, points: int = CURVE_POINTS) -> dict[str, Any] | None:
    """D(x) = y_A(x) − y_B(x) for metric ``key`` over the in-domain range both fronts cover.

    Returns None when either front has fewer than two points with ``key``; otherwise
    ``{"range": [lo, hi] or None, "x", "diff" (value, lo, hi per x), "segments"}``,
    where each segment is a stretch of x with one verdict: ``better`` is ``a``, ``b``
    or None (cannot be told apart), with the smallest and largest difference in it.
    """
    fa = [p for p in front_points(res, a) if key in p.ys]
    fb = [p for p in front_points(res, b) if key in p.ys]
    if len(fa) < 2 or len(fb) < 2:
        return None
    span = lambda f: (min(p.x.point for p in f), max(p.x.point for p in f))  # noqa: E731
    (a_lo, a_hi), (b_lo, b_hi) = span(fa), span(fb)
    lo, hi = max(a_lo, b_lo), min(a_hi, b_hi)
    out: dict[str, Any] = {"a": a, "b": b, "metric": key, "fronts": {a: [a_lo, a_hi], b: [b_lo, b_hi]},
                           "lrs": {a: [p.e for p in fa], b: [p.e for p in fb]},
                           "seeds_per_lr": {a: [len(p.seeds) for p in fa], b: [len(p.seeds) for p in fb]}}
    if not lo < hi:
        out.update(range=None, x=[], diff=[], segments=[])
        return out
    xs = np.linspace(lo, hi, points)
    diffs = []
    for x in xs:
        ya = interpolate_estimate([p.x for p in fa], [p.ys[key] for p in fa], float(x))
        yb = interpolate_estimate([p.x for p in fb], [p.ys[key] for p in fb], float(x))
        diffs.append((ya - yb).as_dict())
    out.update(range=[float(lo), float(hi)], x=[float(x) for x in xs], diff=diffs,
               segments=_segments(xs, diffs, a, b))
    return out


def _verdict(d: dict[str, float], a: str, b: str) -> str | None:
    if not all(math.isfinite(d[k]) for k in ("value", "lo", "hi")):
        return "n/r"
    if d["hi"] < 0:
        return a
    if d["lo"] > 0:
        return b
    return None


def _segments(xs: np.ndarray, diffs: list[dict[str, float]], a: str, b: str) -> list[dict[str, Any]]:
    """Consecutive x with the same verdict, merged, each with the range of the difference's value in it."""
    segs: list[dict[str, Any]] = []
    for x, d in zip(xs, diffs):
        v = _verdict(d, a, b)
        if segs and segs[-1]["better"] == v:
            s = segs[-1]
            s["to"] = float(x)
            s["diff_min"], s["diff_max"] = min(s["diff_min"], d["value"]), max(s["diff_max"], d["value"])
        else:
            segs.append({"from": float(x), "to": float(x), "better": v, "diff_min": d["value"],
                         "diff_max": d["value"]})
    return segs


def all_curves(res: Results) -> dict[str, dict[str, Any]]:
    """Every pair of front methods (in METHODS order) and every curve metric: ``"A - B" -> key -> curve``."""
    methods = [m for m in res.methods() if METHODS[m].extend]
    out: dict[str, dict[str, Any]] = {}
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            row = {key: c for key, _ in CURVE_METRICS if (c := matched_curve(res, a, b, key)) is not None}
            if row:
                out[f"{a} - {b}"] = row
    return out


def alpha_fronts(res: Results) -> dict[str, Any]:
    """Each α-front (alpha.py) against the lr-front of its own method and seed, at the same in-domain change.

    For every α of a source run: its in-domain change and forgetting metrics, and the
    difference y_α − y_lr(x_α) to the lr-front (that method's runs of the same seed, over
    its lrs up to the best in-domain one) read at the α point's own in-domain change,
    paired over documents (one seed: no seed term). ``matches`` is True where the 95%
    interval holds 0; None where the lr-front does not reach that in-domain change.
    """
    out: dict[str, Any] = {}
    for name, by_alpha in res.alpha_runs.items():
        src = next(r for r in res.runs if r.name == name)
        variant = METHODS[src.method].default_variant
        front = sorted([r for r in res.runs if r.method == src.method and r.variant == variant
                        and r.seed == src.seed and not r.failed and r.metrics], key=lambda r: r.e)
        front = front[:efficient_prefix([r.metrics["in_domain"].point for r in front])]
        rows = []
        for alpha, run in sorted(by_alpha.items()):
            row: dict[str, Any] = {"alpha": alpha, "in_domain": run.metrics["in_domain"].as_dict(), "metrics": {}}
            for key, _ in CURVE_METRICS:
                if key not in run.metrics:
                    continue
                cell: dict[str, Any] = {"value": run.metrics[key].as_dict(), "vs_lr_front": None, "matches": None}
                pts = [r for r in front if key in r.metrics]
                if len(pts) >= 2:
                    y_lr = interpolate_estimate([r.metrics["in_domain"] for r in pts], [r.metrics[key] for r in pts],
                                                run.metrics["in_domain"])
                    if math.isfinite(y_lr.point):
                        d = (run.metrics[key] - y_lr).as_dict()
                        cell["vs_lr_front"] = d
                        cell["matches"] = bool(d["lo"] <= 0 <= d["hi"])
                row["metrics"][key] = cell
            rows.append(row)
        out[name] = {"method": src.method, "lr_exponent": src.e, "seed": src.seed, "lr_front": [r.e for r in front],
                     "rows": rows}
    return out


def alpha_lines(fronts: dict[str, Any]) -> list[str]:
    """Markdown rows: per source run and α, in-domain change, each metric and its difference to the lr-front."""
    lines = []
    for name, f in fronts.items():
        for row in f["rows"]:
            cells = []
            for key, _ in CURVE_METRICS:
                c = row["metrics"].get(key)
                if c is None:
                    cells.append("—")
                    continue
                v = c["value"]["value"]
                d = c["vs_lr_front"]
                cells.append(f"{v:+.1f} (vs lr-front " + ("n/r" if d is None else
                             f"{d['value']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]") + ")")
            lines.append(f"| {name} | {row['alpha']:g} | {row['in_domain']['value']:+.1f} | " + " | ".join(cells) + " |")
    return lines


def verdict_lines(curves: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown: per pair and metric, the stretches of in-domain change where each method forgets less."""
    labels = dict(CURVE_METRICS)
    lines = []
    for pair, row in curves.items():
        for key, c in row.items():
            if c["range"] is None:
                lines.append(f"| {pair.replace(' - ', ' − ')} | {labels[key]} | the fronts share no in-domain "
                             f"range ({c['a']} {_r(c['fronts'][c['a']])}, {c['b']} {_r(c['fronts'][c['b']])}) | | |")
                continue
            for s in c["segments"]:
                who = {None: "cannot be told apart", "n/r": "not reached"}.get(s["better"], f"{s['better']} forgets less")
                lines.append(f"| {pair.replace(' - ', ' − ')} | {labels[key]} | {s['from']:+.1f} … {s['to']:+.1f} | "
                             f"{who} | {s['diff_min']:+.1f} … {s['diff_max']:+.1f} |")
    return lines


def _r(span: list[float]) -> str:
    return f"{span[0]:+.1f} … {span[1]:+.1f}"


def plot_curves(curves: dict[str, dict[str, Any]], path: Any) -> bool:
    """One row of panels per pair (a panel per metric): D(x) with its 95% band; False when there is nothing."""
    pairs = [(p, row) for p, row in curves.items() if any(c["range"] for c in row.values())]
    if not pairs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(pairs), len(CURVE_METRICS), figsize=(4.2 * len(CURVE_METRICS), 3.2 * len(pairs)),
                             squeeze=False)
    for i, (pair, row) in enumerate(pairs):
        for j, (key, label) in enumerate(CURVE_METRICS):
            ax = axes[i][j]
            c = row.get(key)
            if not c or not c["range"]:
                ax.set_axis_off()
                continue
            x = np.array(c["x"])
            v = np.array([d["value"] for d in c["diff"]])
            lo = np.array([d["lo"] for d in c["diff"]])
            hi = np.array([d["hi"] for d in c["diff"]])
            ax.fill_between(x, lo, hi, alpha=0.3, lw=0)
            ax.plot(x, v, lw=1.5)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_title(f"{pair.replace(' - ', ' − ')}: {label}", fontsize=9)
            ax.set_xlabel("in-domain PPL change (%)  ← more adaptation", fontsize=8)
            ax.set_ylabel("difference (points); < 0: first forgets less", fontsize=8)
            ax.invert_xaxis()
    fig.suptitle("Matched curves: forgetting difference at equal in-domain change (seed means, 95% bands over "
                 "documents and seeds)", fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return True
