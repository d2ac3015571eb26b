"""The report of the forgetting experiment: results.md, results.json and the plots, from the records alone.

:class:`~gainsurgery_lab.forgetting.analysis.Results` computes every number; this module
renders them (tables, the lr choice, the probes, the matched curves, the front plot and
heatmaps) and writes them whole or not at all. ``compare_runs`` sets any two runs side by
side with paired intervals.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from gainsurgery.io.atomic import atomic_file, write_file

from gainsurgery.io.checks import check_output
from gainsurgery_lab.forgetting import records
from gainsurgery_lab.forgetting.analysis import MATCH_TARGETS, METRICS, Results, Run
from gainsurgery_lab.forgetting.curves import (CURVE_METRICS, all_curves, alpha_fronts, alpha_lines, plot_curves,
                                               verdict_lines)
from gainsurgery_lab.forgetting.data import ForgettingError
from gainsurgery_lab.forgetting.methods import METHODS, VARIANTS, lr_label
from gainsurgery_lab.forgetting.selection import TIE_RULE
from gainsurgery_lab.forgetting.stats import Estimate, wilson_interval


def _f(e: Any, digits: int = 1, ci: bool = True) -> str:
    if e is None:
        return "—"
    if isinstance(e, Estimate):
        e = e.as_dict()
    if isinstance(e, dict):
        v = e["value"]
        if v is None or not math.isfinite(v):
            return "n/r"
        s = f"{v:+.{digits}f}"
        if ci and math.isfinite(e.get("lo", math.nan)):
            s += f" [{e['lo']:+.{digits}f}, {e['hi']:+.{digits}f}]"
        return s
    return f"{e:+.{digits}f}"


def _cell(text: str) -> str:
    """Free text (an error message) as one markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _max_gain(run: Run) -> str:
    """max |s − 1| of the effective gains after the last stage (gain methods), else a dash."""
    g = run.stages[-1].get("gains")
    return f"{g['max_abs_s_minus_1_effective']:.3f}" if g else "—"


def render_markdown(res: Results) -> str:
    c = res.config
    K = len(res.sequence)
    lines = [f"# Forgetting front: {' → '.join(res.sequence)}", "",
             f"Base `{c['base']}`; per stage {c['steps']} steps × {c['batch_size']} windows × {c['seq_len']} "
             f"tokens; {c['test_windows']} test windows per domain (≤ 2 per document), {c['dev_windows']} dev "
             f"windows (other documents) for choosing learning rates; never-trained domains: "
             f"{', '.join(res.extra) or 'none'}. Changes are relative PPL changes in %, with 95% paired "
             f"bootstrap intervals over documents ({res.bs.resamples} resamples). Never-trained domains are "
             "scored after the last stage only.", ""]
    lines += ["## Domains", "", "| domain | test windows (documents) | dev windows (documents) | training documents | "
              "split | base PPL [95% CI] |", "|---|---:|---:|---:|---|---:|"]
    for d in res.columns:
        i = res.domain_info[d]
        b = res.base_ppl[d].as_dict()
        lines.append(f"| {d} | {i['test_windows']} ({i['test_units']}) | {i['dev_windows']} ({i['dev_units']}) | "
                     f"{i['documents_train']} | {i['split']} | {b['value']:.3f} [{b['lo']:.3f}, {b['hi']:.3f}] |")
    lines += ["", "## Fronts (seed 0, one row per learning rate)", "",
              "`dev` is the selection score (mean in-domain dev NLL change, nats/token; lower is better); ✓ marks "
              "the chosen lr. in-domain: own domain at its own stage vs base, mean over stages. earlier: domains "
              "trained before the last stage, after it, vs base / vs right after their own stage.", "",
              "| method | lr | dev | in-domain | earlier vs base | earlier vs own stage | never-trained | params | "
              "max \\|s−1\\| |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in res.methods():
        best = res.chosen(m)
        for r in res.front(m):
            if r.failed:
                lines.append(f"| {m} | {lr_label(r.e)} | failed | {_cell(r.failed)} | | | | | |")
                continue
            mt = r.metrics
            lines.append(f"| {m} | {lr_label(r.e)}{' ✓' if r is best else ''} | {mt['dev_score']:+.4f} | "
                         f"{_f(mt['in_domain'])} | {_f(mt.get('earlier_vs_base'))} | {_f(mt.get('earlier_vs_own'))} | "
                         f"{_f(mt.get('untrained'))} | {r.stages[0]['train']['trainable_parameters']:,} | "
                         f"{_max_gain(r)} |")
    lines += [""]
    for m in res.methods():
        if res.front(m) and METHODS[m].extend:
            lines.append(f"- {m}: dev optimum {'interior' if res.interior(m) else 'AT AN EDGE'} of "
                         f"{len(res.front(m))} lrs.")
    lines += _selection_lines(res)
    if K > 1:
        for key, title in (("earlier_vs_base", "earlier domains vs base"),
                           ("earlier_vs_own", "earlier domains vs their own stage (backward transfer)")):
            mt = res.matched(key)
            if not mt["targets"]:
                continue
            lines += ["", f"## At matched in-domain change: {title}", "",
                      "Interpolated linearly along each front, over its lrs up to its best in-domain one (past it a "
                      "front only turns back); n/r: the front does not reach that in-domain change.",
                      "", "| method | " + " | ".join(f"in-domain {t:+.0f}%" for t in MATCH_TARGETS) + " |",
                      "|---|" + "---:|" * len(MATCH_TARGETS)]
            for m, row in mt["targets"].items():
                lines.append(f"| {m} | " + " | ".join(_f(row[str(t)]) for t in MATCH_TARGETS) + " |")
            lines += ["", "At each method's chosen point (its in-domain change), every front interpolated there; "
                          "in brackets the paired difference to the reference method:", "",
                      "| reference (chosen lr, its in-domain) | " + " | ".join(mt["targets"]) + " |",
                      "|---|" + "---:|" * len(mt["targets"])]
            for ref, entry in mt["at_chosen"].items():
                cells = []
                for m in mt["targets"]:
                    v = entry["values"].get(m)
                    cells.append("—" if v is None else (_f(v, ci=False) + ("" if m == ref else
                                                                           f" (Δ {_f(v['minus_ref'])})")))
                lines.append(f"| {ref} ({entry['lr']:.2g}, {_f(entry['x'], ci=False)}) | " + " | ".join(cells) + " |")
    curves = all_curves(res) if K > 1 else {}
    if curves:
        lines += ["", "## Matched curves: which method forgets less, at every in-domain change both reach", "",
                  "Each front is the seed mean at every lr (all seeds run there), up to its best in-domain lr; the "
                  "difference A − B of a forgetting metric is read along both fronts at the same in-domain change, "
                  "over the range both cover, with a 95% band over documents (paired) and seeds. Negative: A "
                  "forgets less. The plot is matched.png.", "",
                  "| A − B | metric | in-domain change (%) | verdict | A − B (points) |", "|---|---|---|---|---:|"]
        lines += verdict_lines(curves)
    fronts = alpha_fronts(res) if K > 1 else {}
    if fronts:
        lines += ["", "## The α-front: one trained run dialled down after training", "",
                  "The chosen run of a method with every gain at power α (adapters: base + α·their weight change), "
                  "scored like a run, no training. In brackets: the difference to the lr-front of the same method "
                  "and seed read at the same in-domain change (paired over documents); an interval that holds 0 "
                  "means the α-front matches the lr-front there; n/r: the lr-front does not reach that in-domain "
                  "change.", "",
                  "| run | α | in-domain | " + " | ".join(label for _, label in CURVE_METRICS) + " |",
                  "|---|---:|---:|" + "---:|" * len(CURVE_METRICS)]
        lines += alpha_lines(fronts)
    summary = res.seed_summary()
    if summary["methods"]:
        lines += ["", "## The chosen points over seeds", "",
                  "Each method at its chosen lr (seed 0's dev optimum) with every seed run there (data order and "
                  "adapter initialisation): the mean over seeds with a 95% interval that combines the documents' "
                  "bootstrap with a t-interval over the seeds (n − 1 degrees of freedom), and the standard "
                  "deviation over seeds. Seed 0 is the run whose dev score chose the lr; the others were not "
                  "selected on anything.", "",
                  "| method | lr | seeds | " + " | ".join(label for _, label in METRICS) + " |",
                  "|---|---:|---:|" + "---:|" * len(METRICS)]
        for m, row in summary["methods"].items():
            cells = [(_f(row["metrics"][k]) + f" (sd {row['metrics'][k]['sd_over_seeds']:.1f})")
                     if k in row["metrics"] else "—" for k, _ in METRICS]
            lines.append(f"| {m} | {lr_label(row['lr_exponent'])} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
        if summary["differences"]:
            lines += ["", "Differences of the seed means, A − B (documents paired, the seed terms independent); an "
                          "interval that excludes 0 is a difference beyond both the documents' and the seeds' noise "
                          "(assuming seed effects roughly normal):", "",
                      "| A − B | " + " | ".join(label for _, label in METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
            for pair, row in summary["differences"].items():
                lines.append(f"| {pair.replace(' - ', ' − ')} | " + " | ".join(_f(row.get(k)) for k, _ in METRICS) + " |")
        yn = {m: row["yesno"] for m, row in summary["methods"].items() if "yesno" in row}
        if yn:
            lines += ["", "| method | yes/no accuracy, mean over seeds (per seed) | vs base, points | says yes (per seed) | "
                          "McNemar p (per seed) |", "|---|---:|---:|---:|---:|"]
            for m, y in yn.items():
                lines.append(f"| {m} | {100 * y['accuracy_mean']:.1f}% ({', '.join(f'{100 * a:.1f}' for a in y['accuracy_per_seed'])}) | "
                             f"{y['vs_base_points_mean']:+.1f} | {', '.join(f'{100 * r:.0f}%' for r in y['yes_rate_per_seed'])} | "
                             f"{', '.join(_p(p) for p in y['mcnemar_p_per_seed'])} |")
    if res.base_yesno:
        n = res.base_yesno["items"]
        c0 = int(np.sum(res.base_yesno["correct"]))
        lo, hi = wilson_interval(c0, n)
        lines += ["", "## Yes/no (CoQA, zero-shot)", "",
                  f"{n} items (a fixed random sample); {100 * np.mean(res.base_yesno['answers_yes']):.0f}% of the "
                  f"gold answers are yes. Base: {100 * c0 / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (Wilson 95%), "
                  f"says yes {100 * res.base_yesno['yes_rate']:.0f}%. McNemar: exact two-sided test against the "
                  "base on the same items.", "",
                  "| run | accuracy [95% CI] | vs base (points) | says yes | only run right / only base right | "
                  "McNemar p |", "|---|---:|---:|---:|---:|---:|"]
        for r in res.runs:
            row = res.yesno_row(r)
            if row is None:
                continue
            t = row["mcnemar"]
            lines.append(f"| {r.name} | {100 * row['accuracy']:.1f}% [{100 * row['lo']:.1f}, {100 * row['hi']:.1f}] | "
                         f"{row['vs_base_points']:+.1f} | {100 * row['yes_rate']:.0f}% | {t['a_only']} / {t['b_only']} | "
                         f"{_p(t['p_value'])} |")
    lines += _probe_lines(res, summary)
    variants = [r for r in res.runs if r.variant != METHODS[r.method].default_variant and not r.failed]
    if variants:
        lines += ["", "## Staging variants (at the default variant's chosen lr, seed 0)", ""]
        for v, text in VARIANTS.items():
            lines.append(f"- `{v}`: {text}")
        lines += ["", "| method | variant | lr | in-domain | earlier vs base | earlier vs own stage | never-trained | "
                      "max \\|s−1\\| after each stage |", "|---|---|---:|---:|---:|---:|---:|---|"]
        for m in res.methods():
            best = res.chosen(m)
            rows = ([best] if best else []) + [r for r in variants if r.method == m]
            if len(rows) < 2:
                continue
            for r in rows:
                mt = r.metrics
                gains = ", ".join(f"{s['gains']['max_abs_s_minus_1_effective']:.3f}" for s in r.stages
                                  if s.get("gains")) or "—"
                lines.append(f"| {m} | {r.variant} | {lr_label(r.e)} | {_f(mt['in_domain'])} | "
                             f"{_f(mt.get('earlier_vs_base'))} | {_f(mt.get('earlier_vs_own'))} | "
                             f"{_f(mt.get('untrained'))} | {gains} |")
        for r in variants:
            if r.variant == "swap":
                n = r.stages[0]["train"]["trainable_parameters"]
                lines.append(f"\n`{r.method}:swap` keeps one gain file per domain: {K} files of {n:,} float32 gains "
                             f"({4 * n:,} bytes of vectors each, plus a header), and serving needs to know the domain.")
    lines += ["", "## Cost (measured)", "", "| method | trainable params | s/step | s/stage | "
              "peak RSS of a stage (MiB) |", "|---|---:|---:|---:|---:|"]
    process_peak_only = False
    for m in res.methods():
        runs = [r for r in res.runs if r.method == m and not r.failed]
        if runs:
            sps = np.mean([s["train"]["seconds_per_step"] for r in runs for s in r.stages])
            sst = np.mean([s["seconds"]["stage"] for r in runs for s in r.stages])
            peaks = [s["stage_peak_rss_mib"] for r in runs for s in r.stages if "stage_peak_rss_mib" in s]
            process_peak_only |= not peaks
            rss = f"{max(peaks):,.0f}" if peaks else "—"
            lines.append(f"| {m} | {runs[0].stages[0]['train']['trainable_parameters']:,} | {sps:.2f} | {sst:.0f} | "
                         f"{rss} |")
    if process_peak_only:
        lines += ["", "—: these stages recorded only their process's peak memory so far (records from before "
                      "per-stage peaks), which includes every earlier stage of that process."]
    cost = res.cost()
    lines += ["", f"Measured: {cost['stages']} stages took {cost['stage_wall_seconds'] / 3600:.2f} h of wall time "
                  f"(on a shared machine); {cost['stages_with_cpu_seconds']} of them recorded their CPU time: "
                  + (f"{cost['mean_stage_cpu_seconds']:.0f} CPU-seconds per stage on average. "
                     if cost["mean_stage_cpu_seconds"] else "")
                  + f"Yes/no: {cost['yesno_passes']} passes, {cost['yesno_wall_seconds'] / 60:.0f} min wall, "
                  f"{cost['yesno_cpu_seconds'] / 60:.0f} CPU-min.", ""]
    lines += ["## Per-stage matrices (chosen lr, seed 0): PPL change vs base (%)", ""]
    for m in res.methods():
        best = res.chosen(m)
        if best is None or "matrix" not in best.metrics:
            continue
        lines += [f"### {m} (lr {lr_label(best.e)})", "", "| after stage | " + " | ".join(res.columns) + " |",
                  "|---|" + "---:|" * len(res.columns)]
        for k, row in enumerate(best.metrics["matrix"]):
            lines.append(f"| {k + 1}: {res.sequence[k]} | " + " | ".join(f"{x:+.1f}" if math.isfinite(x) else "·"
                                                                         for x in row) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _selection_lines(res: Results) -> list[str]:
    """The lr choice per method: every lr's dev score per selection seed, mean and sd; best, chosen, margin."""
    if res.select_seeds < 2:
        return []
    lines = ["", "## How each lr was chosen", "",
             f"Dev score (mean in-domain dev NLL change, nats/token) of every selection seed at every lr. "
             f"Rule, fixed before any forgetting was looked at and applied to every method: {TIE_RULE}. "
             "best: the lowest mean; margin: how much worse the chosen lr's mean is than the best's. Where the "
             "next lr's mean lies within one sd of the chosen one's, the seeds cannot tell them apart: read "
             "both rows of the fronts.", "",
             "| method | lr | dev score per seed | mean | sd over seeds | |", "|---|---:|---:|---:|---:|---|"]
    for m in res.methods():
        sel = res.selection(m)
        for e in sorted(sel.scores):
            mark = " ".join(x for x, hit in (("best", e == sel.best), ("✓ chosen", e == sel.chosen)) if hit)
            seeds = ", ".join(f"{v:+.4f}" if math.isfinite(v) else "failed" for v in sel.scores[e])
            mean = f"{sel.mean[e]:+.4f}" if math.isfinite(sel.mean[e]) else "—"
            sd = f"{sel.sd[e]:.4f}" if math.isfinite(sel.sd[e]) else "—"
            lines.append(f"| {m} | {lr_label(e)} | {seeds} | {mean} | {sd} | {mark} |")
        if sel.best is not None:
            lines.append(f"| {m} | | | threshold {sel.threshold:+.4f} | sd at best {sel.sd_best:.4f} | "
                         f"margin {sel.margin:.4f} |")
    notes = []
    for m in res.methods():
        sel = res.selection(m)
        if sel.chosen is None:
            continue
        for side, e in sel.neighbours(sel.chosen).items():
            if e is None or not math.isfinite(sel.mean[e]):
                continue
            gap = sel.mean[e] - sel.mean[sel.chosen]
            noise = max(sel.sd[sel.chosen], sel.sd[e])
            verdict = ("within noise: the seeds cannot tell them apart, read both rows" if abs(gap) <= noise
                       else "beyond the seeds' sd")
            notes.append(f"- {m}: the {side} neighbour {lr_label(e)} scores {gap:+.4f} against the chosen "
                         f"{lr_label(sel.chosen)} (seed sd {noise:.4f}): {verdict}.")
    return lines + ([""] + notes if notes else [])


def _probe_lines(res: Results, summary: dict[str, Any]) -> list[str]:
    """The knowledge probes: which carry signal on the base (dev items), and every probed run (test items)."""
    if not res.base_probes:
        return []
    info = res.probe_base()
    lines = ["", "## Knowledge probes", "",
             "Multiple-choice factual statements (gainsurgery_lab/probes.py), answered by the choice of highest "
             "mean log-probability per token. A probe is informative when the base's accuracy on its dev items "
             "is above chance with a 95% Wilson interval that excludes chance; the test items are reported. "
             "κ = (accuracy − chance) / (1 − chance). A probe at chance is uninformative and draws no conclusion.",
             "", "| probe | chance | base, dev items | base, test items | κ (test) | informative |",
             "|---|---:|---:|---:|---:|---|"]
    for name, row in info.items():
        cells = []
        for split in ("dev", "test"):
            a = row.get(split)
            cells.append(f"{100 * a['accuracy']:.1f}% [{100 * a['lo']:.1f}, {100 * a['hi']:.1f}] (n={a['items']})"
                         if a else "—")
        kappa = f"{row['test']['kappa']:+.2f}" if "test" in row else "—"
        lines.append(f"| {name} | {100 * row['chance']:.0f}% | {cells[0]} | {cells[1]} | {kappa} | "
                     f"{'yes' if row['informative'] else 'NO: uninformative'} |")
    rows = [(r, res.probe_row(r)) for r in res.runs]
    rows = [(r, p) for r, p in rows if p]
    if rows:
        lines += ["", "Every probed run, test items, informative probes pooled (accuracy [95% CI], κ, change vs "
                      "the base in points, exact McNemar p against the base on the same items):", "",
                  "| run | accuracy | κ | vs base | only run right / only base right | McNemar p |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r, p in rows:
            a = p.get("informative")
            if a is None:
                continue
            t = a["mcnemar"]
            lines.append(f"| {r.name} | {100 * a['accuracy']:.1f}% [{100 * a['lo']:.1f}, {100 * a['hi']:.1f}] | "
                         f"{a['kappa']:+.2f} | {a['vs_base_points']:+.1f} | {t['a_only']} / {t['b_only']} | "
                         f"{_p(t['p_value'])} |")
    per_method = {m: row["probes"] for m, row in summary.get("methods", {}).items() if "probes" in row}
    if per_method:
        lines += ["", "At the chosen lrs, mean over seeds (per seed), points vs base, McNemar p per seed:", "",
                  "| method | probe | accuracy | vs base | McNemar p |", "|---|---|---:|---:|---:|"]
        for m, probes in per_method.items():
            for name, y in probes.items():
                if name != "informative" and not info.get(name, {}).get("informative"):
                    continue
                lines.append(f"| {m} | {name} | {100 * y['accuracy_mean']:.1f}% "
                             f"({', '.join(f'{100 * a:.1f}' for a in y['accuracy_per_seed'])}) | "
                             f"{y['vs_base_points_mean']:+.1f} | {', '.join(_p(p) for p in y['mcnemar_p_per_seed'])} |")
    return lines


def make_plots(res: Results, out: Path) -> list[Path]:
    """front.png (both earlier metrics vs in-domain, per method, CIs) and one heatmap per chosen run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    if len(res.sequence) > 1:
        fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
        # a point that makes its own domains worse than the base is off the front (and one diverged lr
        # would squash every other point into a corner): such points are named under the plot instead
        off = [r for m in res.methods() for r in res.front(m)
               if not r.failed and r.metrics and r.metrics["in_domain"].point > 0]
        for ax, key, title in ((axes[0], "earlier_vs_base", "earlier domains vs base"),
                               (axes[1], "earlier_vs_own", "earlier domains vs own stage (backward transfer)")):
            for m in res.methods():
                pts = [r for r in res.front(m) if not r.failed and key in r.metrics and r not in off]
                if not pts:
                    continue
                x = [r.metrics["in_domain"].as_dict() for r in pts]
                y = [r.metrics[key].as_dict() for r in pts]
                xv = np.array([p["value"] for p in x])
                yv = np.array([p["value"] for p in y])
                xerr = np.array([[p["value"] - p["lo"] for p in x], [p["hi"] - p["value"] for p in x]])
                yerr = np.array([[p["value"] - p["lo"] for p in y], [p["hi"] - p["value"] for p in y]])
                line = ax.errorbar(xv, yv, xerr=xerr, yerr=yerr, marker="o", ms=4, capsize=2, lw=1.2, label=m)
                for r, xi, yi in zip(pts, xv, yv):
                    ax.annotate(lr_label(r.e), (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
                best = res.chosen(m)
                if best is not None and key in best.metrics:
                    ax.plot([best.metrics["in_domain"].point], [best.metrics[key].point], marker="*", ms=14,
                            color=line[0].get_color(), markeredgecolor="black")
                means = res.seed_means(m) if len(res.seeds(m)) > 1 else {}
                if "in_domain" in means and key in means:  # the chosen point over seeds (docs x seeds CI)
                    mx, my = means["in_domain"].as_dict(), means[key].as_dict()
                    ax.errorbar([mx["value"]], [my["value"]], xerr=[[mx["value"] - mx["lo"]], [mx["hi"] - mx["value"]]],
                                yerr=[[my["value"] - my["lo"]], [my["hi"] - my["value"]]], marker="D", ms=6,
                                color=line[0].get_color(), markeredgecolor="black", capsize=3, lw=2)
            ax.axhline(0, color="grey", lw=0.8)
            ax.axvline(0, color="grey", lw=0.8)
            ax.set_yscale("symlog", linthresh=10)  # linear within ±10%, logarithmic beyond: −8% and +600% both read
            ax.set_xlabel("in-domain PPL change at own stage, mean over stages (%)  ← better")
            ax.set_ylabel("PPL change (%)  ↓ better; symlog, linear within ±10")
            ax.set_title(title, fontsize=10)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{' → '.join(res.sequence)}: one point per lr (label, seed 0), ★ = lr chosen on dev, "
                     "◆ = its mean over seeds; 95% bootstrap CIs",
                     fontsize=10)
        if off:
            fig.text(0.01, 0.01, "not shown (in-domain worse than the base): " + ", ".join(
                f"{r.method} {lr_label(r.e)} ({r.metrics['in_domain'].point:+,.0f}%)" for r in off), fontsize=7)
        fig.tight_layout(rect=(0, 0.03 if off else 0, 1, 1))
        p = out / "front.png"
        _save_figure(fig, p)
        plt.close(fig)
        paths.append(p)
    for m in res.methods():
        best = res.chosen(m)
        if best is None or "matrix" not in best.metrics:
            continue
        data = np.array(best.metrics["matrix"])
        lim = max(1.0, float(np.nanmax(np.abs(data))))  # each method its own symmetric scale
        fig, ax = plt.subplots(figsize=(max(5.5, 2.5 + 0.9 * len(res.columns)), 2.2 + 0.5 * len(data)))
        im = ax.imshow(data, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(len(res.columns)), res.columns, rotation=45, ha="right")
        ax.set_yticks(range(len(data)), [f"{k + 1}: {d}" for k, d in enumerate(res.sequence[:len(data)])])
        for i, row in enumerate(data):
            for j, x in enumerate(row):
                if math.isfinite(x):
                    ax.text(j, i, f"{x:+.1f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(x) > 0.6 * lim else "black")
        ax.set_xlabel("evaluated domain")
        ax.set_ylabel("after stage")
        ax.set_title(f"{m} (lr {lr_label(best.e)}): PPL change vs base (%), scale ±{lim:.1f}", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
        fig.tight_layout()
        p = out / f"heatmap-{m}.png"
        _save_figure(fig, p)
        plt.close(fig)
        paths.append(p)
    return paths


def write_report(out: Path, resamples: int = 2000) -> list[Path]:
    """results.json, results.md and the plots, into ``out``; returns their paths."""
    t0 = time.perf_counter()
    res = Results(out, resamples=resamples)
    data = res.to_json()
    data["report_seconds"] = round(time.perf_counter() - t0, 1)

    # every output checked before the first is written: a report is written whole or not at all
    names = ["results.json", "results.md", "front.png", "matched.png", *(f"heatmap-{m}.png" for m in res.methods())]
    for name in names:
        check_output(out / name, kind="file", what="report file", error=ForgettingError)
    markdown = render_markdown(res)
    write_file(out / "results.json", records.dumps(data, indent=1) + "\n", error=ForgettingError)
    write_file(out / "results.md", markdown, error=ForgettingError)
    paths = [out / "results.json", out / "results.md", *make_plots(res, out)]
    if plot_curves(data["matched_curves"], out / "matched.png"):
        paths.append(out / "matched.png")
    return paths


def _p(p: float) -> str:
    """A p-value for a table: three decimals, or "<0.001" (never a misleading 0.000)."""
    return "<0.001" if p < 0.0005 else f"{p:.3f}"


def _save_figure(fig: Any, path: Path) -> None:
    """A PNG written whole or not at all (gainsurgery's output rules: never through a link)."""

    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=120)


def compare_runs(out: Path, name_a: str, name_b: str, resamples: int = 2000) -> str:
    """A markdown table of two finished runs' metrics and A - B with paired 95% bootstrap intervals.

    The intervals resample the same documents for both runs (they are scored on the same
    windows), so the difference is far tighter than the two intervals side by side.

    Raises:
        ForgettingError: no such run, or it has not finished.
    """
    res = Results(out, resamples=resamples)
    by_name = {r.name: r for r in res.runs}
    picked = []
    for name in (name_a, name_b):
        run = by_name.get(name)
        if run is None or run.failed or not run.metrics:
            known = ", ".join(sorted(n for n, r in by_name.items() if r.metrics and not r.failed)) or "none"
            raise ForgettingError(f"{name!r} is not a finished run under {out}/runs (finished: {known})")
        picked.append(run)
    a, b = picked
    lines = [f"| metric (PPL change %, 95% CI) | A: {a.name} | B: {b.name} | A - B (paired) |", "|---|---:|---:|---:|"]
    for key, label in METRICS:
        if key in a.metrics and key in b.metrics:
            lines.append(f"| {label} | {_f(a.metrics[key].as_dict())} | {_f(b.metrics[key].as_dict())} | "
                         f"{_f((a.metrics[key] - b.metrics[key]).as_dict())} |")
    return "\n".join(lines)
