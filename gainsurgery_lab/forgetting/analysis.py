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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gainsurgery_lab.forgetting import records
from gainsurgery_lab.forgetting.data import ForgettingError
from gainsurgery_lab.forgetting.methods import METHODS
from gainsurgery_lab.forgetting.curves import all_curves, alpha_fronts, method_seed
from gainsurgery_lab.forgetting.selection import Selection, choose
from gainsurgery_lab.forgetting.stats import (Bootstrap, DomainWindows, Estimate, efficient_prefix,
                                              interpolate_estimate, mcnemar_exact, mean_estimate,
                                              seed_mean_estimate, wilson_interval)

#: In-domain changes (%) at which fronts are compared in the "matched" table.
MATCH_TARGETS = (-5.0, -10.0, -15.0, -20.0, -25.0, -30.0)
#: The headline metrics, in table order, with their labels.
METRICS = (("in_domain", "in-domain"), ("earlier_vs_base", "earlier vs base"),
           ("earlier_vs_own", "earlier vs own stage"), ("untrained", "never-trained"))


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
    probes: dict | None = None

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
        self.base_probes = self._probes("base_probes.json")
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
                run.probes = self._probes(f"runs/{d.name}/probes.json")
            self.runs.append(run)
        self.alpha_runs = self._alpha_runs()

    def _alpha_runs(self) -> dict[str, dict[float, Run]]:
        """The α-front records (alpha.py): source run name -> α -> a Run of its scaled models (complete only)."""
        found: dict[str, dict[float, Run]] = {}
        root = self.out / "alpha"
        by_name = {r.name: r for r in self.runs if not r.failed}
        if not root.is_dir() or root.is_symlink():
            return found
        for src_dir in sorted(root.iterdir()):
            src = by_name.get(src_dir.name)
            if src is None or not src_dir.is_dir() or src_dir.is_symlink():
                continue
            for a_dir in sorted(src_dir.iterdir()):
                stages = []
                for k in range(1, len(self.sequence) + 1):
                    rel = f"alpha/{src_dir.name}/{a_dir.name}/stage-{k}.json"
                    raw = records.read(self.out, rel)
                    if raw is None:
                        break
                    stages.append(records.alpha_stage_record(raw, str(self.out / rel), self.layout, k))
                if len(stages) < len(self.sequence) or len({s["alpha"] for s in stages}) != 1:
                    continue
                alpha = stages[0]["alpha"]
                run = Run(f"{src.name}@{alpha:g}", src.method, src.variant, src.e, src.lr, src.seed, stages)
                run.metrics = self._metrics(run)
                found.setdefault(src.name, {})[alpha] = run
        return found

    def _probes(self, rel: str) -> dict | None:
        raw = records.read(self.out, rel)
        return None if raw is None else records.probes_record(raw, str(self.out / rel))

    # ------------------------------------------------------------------------------ knowledge probes
    def probe_names(self) -> list[str]:
        """The probes the base was scored on, in the order they first appear."""
        return list(dict.fromkeys(self.base_probes["probe"])) if self.base_probes else []

    def probe_base(self) -> dict[str, Any]:
        """Per probe: chance, the base's dev accuracy (which decides whether the probe carries signal) and test.

        A probe is *informative* when the lower end of the Wilson 95% interval of the base's
        accuracy on its **dev** items lies above chance; the test items, which are reported,
        take no part in that decision.
        """
        bp = self.base_probes
        out: dict[str, Any] = {}
        for name in self.probe_names():
            row: dict[str, Any] = {}
            for split in ("dev", "test"):
                idx = [i for i, (p, sp) in enumerate(zip(bp["probe"], bp["split"])) if p == name and sp == split]
                if not idx:
                    continue
                chance = float(np.mean([1 / bp["choices"][i] for i in idx]))
                row[split] = _accuracy([bp["correct"][i] for i in idx], chance)
                row["chance"] = chance
            row["informative"] = bool("dev" in row and row["dev"]["lo"] > row["chance"])
            out[name] = row
        return out

    def probe_row(self, run: Run) -> dict[str, Any] | None:
        """A run's accuracy per probe on the test items, with κ and an exact McNemar test against the base."""
        if run.probes is None or self.base_probes is None:
            return None
        bp = self.base_probes
        base_by_id = {i: c for i, c, sp in zip(bp["ids"], bp["correct"], bp["split"]) if sp == "test"}
        info = self.probe_base()
        out: dict[str, Any] = {}
        groups = {name: [name] for name in info}
        groups["informative"] = [n for n, row in info.items() if row["informative"]]
        for label, names in groups.items():
            idx = [i for i, (p, sp, item) in enumerate(zip(run.probes["probe"], run.probes["split"], run.probes["ids"]))
                   if p in names and sp == "test" and item in base_by_id]
            if not idx:
                continue
            chance = float(np.mean([1 / run.probes["choices"][i] for i in idx]))
            mine = [run.probes["correct"][i] for i in idx]
            theirs = [base_by_id[run.probes["ids"][i]] for i in idx]
            row = _accuracy(mine, chance)
            row["vs_base_points"] = 100 * (np.mean(mine) - np.mean(theirs))
            row["mcnemar"] = mcnemar_exact(mine, theirs)
            out[label] = row
        return out

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

    @property
    def select_seeds(self) -> int:
        """Seeds at every lr of a front (1 in folders made before seeds were part of the choice)."""
        n = self.config.get("select_seeds", 1)
        return n if type(n) is int and n >= 1 else 1

    def selection(self, method: str) -> Selection:
        """The runner's lr choice, recomputed from the records (the same rule, :mod:`.selection`)."""
        variant = METHODS[method].default_variant
        by_lr: dict[int, dict[int, float]] = {}
        for r in self.runs:
            if r.method == method and r.variant == variant and r.seed < self.select_seeds:
                by_lr.setdefault(r.e, {})[r.seed] = math.inf if r.failed else r.metrics["dev_score"]
        scores = {e: [v[s] for s in sorted(v)] for e, v in by_lr.items() if len(v) == self.select_seeds}
        return choose(scores, self.select_seeds)

    def _seed0(self, method: str, e: int | None) -> Run | None:
        return next((r for r in self.front(method) if r.e == e), None) if e is not None else None

    def chosen(self, method: str) -> Run | None:
        """Seed 0 of the lr the tie rule chose (see :meth:`selection`)."""
        return self._seed0(method, self.selection(method).chosen)

    def best(self, method: str) -> Run | None:
        """Seed 0 of the lr with the best mean dev score (the chosen one unless the tie rule moved off it)."""
        return self._seed0(method, self.selection(method).best)

    def interior(self, method: str) -> bool:
        """Whether both the best and the chosen lr have a tried lr on either side."""
        sel = self.selection(method)
        lrs = sorted(sel.scores)
        return sel.best is not None and all(0 < lrs.index(e) < len(lrs) - 1 for e in (sel.best, sel.chosen))

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
                out[key] = seed_mean_estimate(ests, seed=method_seed(method))
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
            pr = [self.probe_row(r) for r in runs]
            if all(pr):
                row["probes"] = {name: {"accuracy_mean": float(np.mean([p[name]["accuracy"] for p in pr])),
                                        "accuracy_per_seed": [p[name]["accuracy"] for p in pr],
                                        "vs_base_points_mean": float(np.mean([p[name]["vs_base_points"] for p in pr])),
                                        "mcnemar_p_per_seed": [p[name]["mcnemar"]["p_value"] for p in pr]}
                                 for name in pr[0] if all(name in p for p in pr)}
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
                row["probes"] = self.probe_row(r)
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
            "selection": {m: self.selection(m).as_dict() for m in self.methods()},
            "probes_base": self.probe_base() if self.base_probes else None,
            "interior": {m: self.interior(m) for m in self.methods()},
            "matched_earlier_vs_base": self.matched("earlier_vs_base") if len(self.sequence) > 1 else None,
            "matched_earlier_vs_own": self.matched("earlier_vs_own") if len(self.sequence) > 1 else None,
            "seeds_at_chosen": self.seed_summary(),
            "matched_curves": all_curves(self) if len(self.sequence) > 1 else {},
            "alpha_fronts": alpha_fronts(self) if len(self.sequence) > 1 else {},
            "runs": runs, "cost": self.cost(),
        }

    def cost(self) -> dict[str, Any]:
        """Measured compute, from the stage and yes/no records.

        Wall seconds count everything (a shared or paused machine too); CPU seconds
        (process time, all threads) are what the work itself took, where recorded.
        """
        stages = [s for r in self.runs for s in r.stages if "seconds" in s]
        passes = [r.yesno for r in self.runs if r.yesno] + ([self.base_yesno] if self.base_yesno else [])
        probe_passes = [r.probes for r in self.runs if r.probes] + ([self.base_probes] if self.base_probes else [])
        with_cpu = [s for s in stages if "cpu_seconds" in s]
        return {"stages": len(stages), "stage_wall_seconds": round(sum(s["seconds"]["stage"] for s in stages)),
                "stages_with_cpu_seconds": len(with_cpu),
                "stage_cpu_seconds": round(sum(s["cpu_seconds"] for s in with_cpu)),
                "mean_stage_cpu_seconds": round(float(np.mean([s["cpu_seconds"] for s in with_cpu])), 1)
                if with_cpu else None,
                "yesno_passes": len(passes), "yesno_wall_seconds": round(sum(p.get("seconds", 0) for p in passes)),
                "yesno_cpu_seconds": round(sum(p.get("cpu_seconds", 0) for p in passes)),
                "probe_passes": len(probe_passes),
                "probe_wall_seconds": round(sum(p.get("seconds", 0) for p in probe_passes)),
                "probe_cpu_seconds": round(sum(p.get("cpu_seconds", 0) for p in probe_passes)),
                "base_seconds": self.base.get("seconds")}


# ---------------------------------------------------------------------------------- rendering


def _accuracy(correct: list[bool], chance: float) -> dict[str, Any]:
    """Accuracy with its Wilson 95% interval and Cohen's κ against a chance level (the choices' 1/k)."""
    n, k = len(correct), int(np.sum(correct))
    lo, hi = wilson_interval(k, n)
    acc = k / n
    return {"items": n, "accuracy": acc, "lo": lo, "hi": hi, "chance": chance,
            "kappa": (acc - chance) / (1 - chance) if chance < 1 else math.nan}
