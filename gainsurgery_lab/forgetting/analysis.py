"""Tables, fronts and plots of the forgetting experiment, from the stored per-window NLLs.

Definitions (every change is a relative PPL change in percent, on the **test** windows):

- ``in_domain``: stage k's own domain after stage k vs the base, averaged over the
  stages — how much a method adapts (negative is better);
- ``earlier_vs_base``: after the last stage, the domains trained before it vs the
  base, averaged — the paper's "earlier domains" metric;
- ``earlier_vs_own``: after the last stage, the domains trained before it vs right
  after their own stage, averaged — backward transfer (positive = forgotten);
- ``untrained``: the never-trained domains after the last stage vs the base.

A method's **front** is its (in_domain, earlier_*) points across learning rates.
``matched`` compares methods at the same in-domain change by linear interpolation
along each front (:func:`~gainsurgery_lab.forgetting.stats.interpolate_estimate`).
All intervals are 95% paired bootstrap intervals over documents
(:mod:`~gainsurgery_lab.forgetting.stats`). Learning rates are chosen on the dev
windows only (:meth:`~gainsurgery_lab.forgetting.runner.Experiment.dev_score`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gainsurgery_lab.forgetting import records
from gainsurgery_lab.forgetting.data import ForgettingError
from gainsurgery_lab.forgetting.methods import METHODS, VARIANTS, lr_label
from gainsurgery_lab.forgetting.stats import (Bootstrap, DomainWindows, Estimate, efficient_prefix,
                                              interpolate_estimate, mcnemar_exact, mean_estimate,
                                              seed_mean_estimate, wilson_interval)

#: In-domain changes (%) at which fronts are compared in the "matched" table.
MATCH_TARGETS = (-5.0, -10.0, -15.0, -20.0, -25.0, -30.0)
#: The headline metrics, in table order, with their labels.
METRICS = (("in_domain", "in-domain"), ("earlier_vs_base", "earlier vs base"),
           ("earlier_vs_own", "earlier vs own stage"), ("untrained", "never-trained"))


def _method_seed(method: str) -> int:
    """A fixed seed per method for the seed level of the bootstrap (methods draw independently)."""
    import zlib

    return zlib.crc32(method.encode())




@dataclass
class Run:
    """A finished (or failed) sequence as stored on disk."""

    name: str
    method: str
    variant: str
    e: int
    lr: float
    seed: int
    stages: list[dict]
    yesno: dict | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> str | None:
        return self.stages[-1].get("failed") if self.stages else None


class Results:
    """Everything under an experiment folder, with bootstrap estimates."""

    def __init__(self, out: Path, resamples: int = 2000) -> None:
        self.out = out = Path(out)
        if not out.is_dir():
            raise ForgettingError(f"{out}: not a folder")
        raw_exp, raw_base = records.read(out, "experiment.json"), records.read(out, "base.json")
        if raw_exp is None or raw_base is None:
            raise ForgettingError(f"{out}: no finished experiment data (experiment.json and base.json)")
        exp = records.experiment_record(raw_exp, str(out / "experiment.json"))
        self.config = exp["config"]
        self.sequence = [d["name"] for d in exp["signature"]["sequence"]]
        self.extra = [d["name"] for d in exp["signature"]["extra_eval"]]
        self.columns = self.sequence + self.extra
        self.seq_len = exp["signature"]["seq_len"]
        windows = {}
        self.domain_info = {}
        dev_counts = {}
        for name in self.columns:
            rel = f"data/{name}/windows.json"
            w = records.read(out, rel, max_bytes=records.MAX_WINDOWS_BYTES)
            if w is None:  # the bootstrap needs the test windows' documents
                raise ForgettingError(f"{out}: {rel} is missing (the test windows' documents, which the "
                                      "intervals resample)")
            w = records.windows_record(w, str(out / rel), name, self.seq_len)
            self.domain_info[name] = w["info"]
            windows[name] = DomainWindows(tuple(w["test"]["units"]), tuple(len(x) - 1 for x in w["test"]["ids"]))
            dev_counts[name] = len(w["dev"]["ids"])
        self.layout = records.Layout(tuple(self.sequence), tuple(self.columns),
                                     {d: len(windows[d].units) for d in self.columns}, dev_counts, self.seq_len)
        self.base = records.scores_record(raw_base, str(out / "base.json"), self.layout)
        self.bs = Bootstrap(windows, resamples=resamples, seed=0)
        self.base_ppl = {d: self.bs.ppl(d, self.base["test_nll"][d]) for d in self.columns}
        self.base_yesno = self._yesno("base_yesno.json")
        self.runs: list[Run] = []
        runs_dir = out / "runs"
        for d in sorted(runs_dir.iterdir()) if runs_dir.is_dir() and not runs_dir.is_symlink() else []:
            info = records.read(out, f"runs/{d.name}/run.json")
            if info is None:
                continue
            info = records.run_record(info, str(d / "run.json"), d.name)
            stages = []
            for k in range(len(self.sequence)):
                rel = f"runs/{d.name}/stage-{k + 1}.json"
                rec = records.read(out, rel)
                if rec is None:
                    break
                stages.append(records.stage_record(rec, str(out / rel), self.layout, k + 1))
                if rec.get("failed"):
                    break
            if not stages or (len(stages) < len(self.sequence) and not stages[-1].get("failed")):
                continue  # unfinished: not reported
            if not stages[-1].get("failed") and len(stages[-1]["test_nll"]) < len(self.columns) \
                    and info["variant"] != "swap":
                raise ForgettingError(f"{out}/runs/{d.name}/stage-{len(stages)}.json: the last stage must score "
                                      f"every domain ({', '.join(self.columns)})")
            for k, st in enumerate(stages[1:], start=1):  # earlier domains are scored at every stage
                if not st.get("failed") and info["variant"] != "swap" and \
                        not set(self.sequence[:k + 1]) <= set(st["test_nll"]):
                    raise ForgettingError(f"{out}/runs/{d.name}/stage-{k + 1}.json: test_nll must score the "
                                          f"domains trained so far ({', '.join(self.sequence[:k + 1])})")
            run = Run(d.name, info["method"], info["variant"], info["lr_exponent"], info["lr"], info["seed"],
                      stages, self._yesno(f"runs/{d.name}/yesno.json"))
            if not run.failed:
                run.metrics = self._metrics(run)
            self.runs.append(run)

    def _yesno(self, rel: str) -> dict | None:
        raw = records.read(self.out, rel)
        return None if raw is None else records.yesno_record(raw, str(self.out / rel))

    # ------------------------------------------------------------------------------ metrics
    def _ppl(self, run: Run, k: int, domain: str) -> Estimate:
        return self.bs.ppl(domain, run.stages[k]["test_nll"][domain])

    def _metrics(self, run: Run) -> dict[str, Any]:
        K = len(self.sequence)
        own = [self._ppl(run, k, d).change_vs(self.base_ppl[d]) for k, d in enumerate(self.sequence)]
        swap = run.variant == "swap"
        m: dict[str, Any] = {"in_domain_stages": own, "in_domain": mean_estimate(own)}
        if K > 1:
            if swap:  # each domain is served by its own file: earlier domains stay at their own stage
                earlier_base = [own[j] for j in range(K - 1)]
                earlier_own = [Estimate(0.0, np.zeros(self.bs.resamples)) for _ in range(K - 1)]
            else:
                earlier_base = [self._ppl(run, K - 1, d).change_vs(self.base_ppl[d]) for d in self.sequence[:-1]]
                earlier_own = [self._ppl(run, K - 1, d).change_vs(self._ppl(run, j, d))
                               for j, d in enumerate(self.sequence[:-1])]
            m["earlier_vs_base"] = mean_estimate(earlier_base)
            m["earlier_vs_own"] = mean_estimate(earlier_own)
            m["earlier_by_stage"] = [None] + [
                None if swap else mean_estimate([self._ppl(run, k, d).change_vs(self.base_ppl[d])
                                                 for d in self.sequence[:k]]) for k in range(1, K)]
        if self.extra and not swap:
            m["untrained"] = mean_estimate([self._ppl(run, K - 1, d).change_vs(self.base_ppl[d])
                                            for d in self.extra])
        if not swap:  # NaN where a domain was not scored after that stage (never-trained, before the end)
            m["matrix"] = [[100 * (math.exp(sum(st["test_nll"][d]) / sum(self.bs.tokens[d])) /
                                   self.base_ppl[d].point - 1) if d in st["test_nll"] else math.nan
                            for d in self.columns] for st in run.stages]
        m["dev_score"] = self._dev_score(run)
        return m

    def _dev_score(self, run: Run) -> float:
        diffs = []
        for rec in run.stages:
            d = rec["domain"]
            tok = len(rec["dev_nll"][d]) * (self.seq_len - 1)
            diffs.append((sum(rec["dev_nll"][d]) - sum(self.base["dev_nll"][d])) / tok)
        return float(np.mean(diffs))

    # ------------------------------------------------------------------------------ selections
    def front(self, method: str) -> list[Run]:
        """Seed-0 runs of ``method``'s default variant, by lr (failed runs included)."""
        variant = METHODS[method].default_variant
        return sorted([r for r in self.runs if r.method == method and r.variant == variant and r.seed == 0],
                      key=lambda r: r.e)

    def chosen(self, method: str) -> Run | None:
        ok = [r for r in self.front(method) if not r.failed]
        return min(ok, key=lambda r: r.metrics["dev_score"]) if ok else None

    def interior(self, method: str) -> bool:
        front = [r for r in self.front(method)]
        best = self.chosen(method)
        return best is not None and 0 < front.index(best) < len(front) - 1

    def seeds(self, method: str) -> list[Run]:
        best = self.chosen(method)
        if best is None:
            return []
        return sorted([r for r in self.runs if r.method == method and r.variant == best.variant and r.e == best.e
                       and not r.failed], key=lambda r: r.seed)

    def seed_means(self, method: str) -> dict[str, Estimate]:
        """Each headline metric of ``method``'s chosen lr, averaged over its seeds (docs × seeds bootstrap)."""
        runs = self.seeds(method)
        out = {}
        for key, _ in METRICS:
            ests = [r.metrics[key] for r in runs if key in r.metrics]
            if runs and len(ests) == len(runs):
                out[key] = seed_mean_estimate(ests, seed=_method_seed(method))
        return out

    def seed_summary(self) -> dict[str, Any]:
        """The chosen points over seeds, and the paired differences between methods' seed means.

        For every method with at least two seeds at its chosen lr: each metric's mean
        over seeds with a 95% interval that resamples documents and seeds, the standard
        deviation over seeds and the per-seed values; then, for every pair of such
        methods, A − B of the seed means (documents paired, seeds drawn independently).
        """
        methods = [m for m in self.methods() if len(self.seeds(m)) > 1]
        means = {m: self.seed_means(m) for m in methods}
        summary: dict[str, Any] = {"methods": {}, "differences": {}}
        for m in methods:
            runs = self.seeds(m)
            row: dict[str, Any] = {"lr": runs[0].lr, "lr_exponent": runs[0].e, "seeds": [r.seed for r in runs],
                                   "metrics": {}}
            for key, est in means[m].items():
                vals = [r.metrics[key].point for r in runs]
                row["metrics"][key] = {**est.as_dict(), "sd_over_seeds": float(np.std(vals, ddof=1)),
                                       "per_seed": vals}
            yn = [self.yesno_row(r) for r in runs]
            if all(yn):
                acc = [y["accuracy"] for y in yn]
                row["yesno"] = {"accuracy_mean": float(np.mean(acc)), "accuracy_per_seed": acc,
                                "vs_base_points_mean": float(np.mean([y["vs_base_points"] for y in yn])),
                                "yes_rate_per_seed": [y["yes_rate"] for y in yn],
                                "mcnemar_p_per_seed": [y["mcnemar"]["p_value"] for y in yn]}
            summary["methods"][m] = row
        for i, a in enumerate(methods):
            for b in methods[i + 1:]:
                summary["differences"][f"{a} - {b}"] = {
                    key: (means[a][key] - means[b][key]).as_dict() for key, _ in METRICS
                    if key in means[a] and key in means[b]}
        return summary

    def methods(self) -> list[str]:
        present = {r.method for r in self.runs}
        return [m for m in METHODS if m in present]

    def matched(self, y_key: str) -> dict[str, Any]:
        """Each method's ``y_key`` interpolated at fixed in-domain changes and at the others' chosen points."""
        table: dict[str, Any] = {"targets": {}, "at_chosen": {}}
        fronts = {m: [r for r in self.front(m) if not r.failed and y_key in r.metrics] for m in self.methods()}
        # up to each front's best in-domain lr: beyond it, the front only turns back (see efficient_prefix)
        fronts = {m: f[:efficient_prefix([r.metrics["in_domain"].point for r in f])] for m, f in fronts.items()}
        fronts = {m: f for m, f in fronts.items() if len(f) >= 2}
        for m, f in fronts.items():
            xs = [r.metrics["in_domain"] for r in f]
            ys = [r.metrics[y_key] for r in f]
            table["targets"][m] = {str(t): interpolate_estimate(xs, ys, t).as_dict() for t in MATCH_TARGETS}
        for ref in fronts:
            best = self.chosen(ref)
            if best is None:
                continue
            x_ref = best.metrics["in_domain"]
            row = {}
            for m, f in fronts.items():
                xs = [r.metrics["in_domain"] for r in f]
                ys = [r.metrics[y_key] for r in f]
                y = interpolate_estimate(xs, ys, x_ref)
                row[m] = {**y.as_dict(), "minus_ref": (y - best.metrics[y_key]).as_dict()}
            table["at_chosen"][ref] = {"x": x_ref.as_dict(), "lr": best.lr, "values": row}
        return table

    def yesno_row(self, run: Run) -> dict[str, Any] | None:
        if run.yesno is None or self.base_yesno is None or run.yesno["items"] != self.base_yesno["items"]:
            return None  # McNemar pairs item by item: only runs scored on the base's items
        n = run.yesno["items"]
        correct = int(np.sum(run.yesno["correct"]))
        lo, hi = wilson_interval(correct, n)
        test = mcnemar_exact(run.yesno["correct"], self.base_yesno["correct"])
        return {"accuracy": correct / n, "lo": lo, "hi": hi, "yes_rate": run.yesno["yes_rate"], "items": n,
                "vs_base_points": 100 * (correct / n - self.base_yesno["accuracy"]),
                "mcnemar": test}

    # ------------------------------------------------------------------------------ export
    def to_json(self) -> dict[str, Any]:
        def est(e):
            return e.as_dict() if isinstance(e, Estimate) else e

        runs = []
        for r in self.runs:
            row = {"name": r.name, "method": r.method, "variant": r.variant, "lr": r.lr, "lr_exponent": r.e,
                   "seed": r.seed, "failed": r.failed}
            if not r.failed:
                met = r.metrics
                row.update({k: est(met[k]) for k in ("in_domain", "earlier_vs_base", "earlier_vs_own", "untrained")
                            if k in met})
                row["in_domain_stages"] = [est(e) for e in met["in_domain_stages"]]
                row["earlier_by_stage"] = [est(e) for e in met.get("earlier_by_stage", [])]
                row["matrix_vs_base"] = met.get("matrix")
                row["dev_score"] = met["dev_score"]
                row["trainable_parameters"] = r.stages[0]["train"]["trainable_parameters"]
                row["seconds_per_step"] = float(np.mean([s["train"]["seconds_per_step"] for s in r.stages]))
                row["stage_seconds"] = [s["seconds"]["stage"] for s in r.stages]
                row["peak_rss_mib"] = max(s.get("peak_rss_mib", 0) for s in r.stages)  # the process's, so far
                if all("stage_peak_rss_mib" in s for s in r.stages):
                    row["stage_peak_rss_mib"] = max(s["stage_peak_rss_mib"] for s in r.stages)
                if r.stages[0].get("gains"):
                    row["max_abs_s_minus_1"] = [s["gains"]["max_abs_s_minus_1_effective"] if s.get("gains") else None
                                                for s in r.stages]
                if r.stages[0].get("peft"):
                    row["peft"] = r.stages[0]["peft"]
                row["yesno"] = self.yesno_row(r)
            runs.append(row)
        base_yn = None
        if self.base_yesno:
            n = self.base_yesno["items"]
            c = int(np.sum(self.base_yesno["correct"]))
            lo, hi = wilson_interval(c, n)
            base_yn = {"accuracy": c / n, "lo": lo, "hi": hi, "yes_rate": self.base_yesno["yes_rate"], "items": n,
                       "answers_yes_rate": float(np.mean(self.base_yesno["answers_yes"]))}
        return {
            "sequence": self.sequence, "extra_eval": self.extra, "config": self.config,
            "domains": self.domain_info,
            "base_ppl": {d: self.base_ppl[d].as_dict() for d in self.columns}, "base_yesno": base_yn,
            "chosen": {m: (self.chosen(m).name if self.chosen(m) else None) for m in self.methods()},
            "interior": {m: self.interior(m) for m in self.methods()},
            "matched_earlier_vs_base": self.matched("earlier_vs_base") if len(self.sequence) > 1 else None,
            "matched_earlier_vs_own": self.matched("earlier_vs_own") if len(self.sequence) > 1 else None,
            "seeds_at_chosen": self.seed_summary(),
            "runs": runs, "cost": self.cost(),
        }

    def cost(self) -> dict[str, Any]:
        """Measured compute, from the stage and yes/no records.

        Wall seconds count everything (a shared or paused machine too); CPU seconds
        (process time, all threads) are what the work itself took, where recorded.
        """
        stages = [s for r in self.runs for s in r.stages if "seconds" in s]
        passes = [r.yesno for r in self.runs if r.yesno] + ([self.base_yesno] if self.base_yesno else [])
        with_cpu = [s for s in stages if "cpu_seconds" in s]
        return {"stages": len(stages), "stage_wall_seconds": round(sum(s["seconds"]["stage"] for s in stages)),
                "stages_with_cpu_seconds": len(with_cpu),
                "stage_cpu_seconds": round(sum(s["cpu_seconds"] for s in with_cpu)),
                "mean_stage_cpu_seconds": round(float(np.mean([s["cpu_seconds"] for s in with_cpu])), 1)
                if with_cpu else None,
                "yesno_passes": len(passes), "yesno_wall_seconds": round(sum(p.get("seconds", 0) for p in passes)),
                "yesno_cpu_seconds": round(sum(p.get("cpu_seconds", 0) for p in passes)),
                "base_seconds": self.base.get("seconds")}


# ---------------------------------------------------------------------------------- rendering


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
    from gainsurgery.io.atomic import write_file
    from gainsurgery.io.checks import check_output

    # every output checked before the first is written: a report is written whole or not at all
    names = ["results.json", "results.md", "front.png", *(f"heatmap-{m}.png" for m in res.methods())]
    for name in names:
        check_output(out / name, kind="file", what="report file", error=ForgettingError)
    markdown = render_markdown(res)
    write_file(out / "results.json", records.dumps(data, indent=1) + "\n", error=ForgettingError)
    write_file(out / "results.md", markdown, error=ForgettingError)
    return [out / "results.json", out / "results.md", *make_plots(res, out)]


def _p(p: float) -> str:
    """A p-value for a table: three decimals, or "<0.001" (never a misleading 0.000)."""
    return "<0.001" if p < 0.0005 else f"{p:.3f}"


def _save_figure(fig: Any, path: Path) -> None:
    """A PNG written whole or not at all (gainsurgery's output rules: never through a link)."""
    from gainsurgery.io.atomic import atomic_file

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
