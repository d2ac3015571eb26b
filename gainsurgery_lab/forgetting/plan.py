"""Planning the experiment: which runs come next, and which lr each method gets.

Decisions are made on dev scores only (in-domain dev NLL change at each stage's own
step), never on the reported test windows nor on forgetting:

- the initial grids, methods interleaved and each grid from its middle out, seed 0 of
  every front before the next seed (:meth:`Plan.static_keys`), so a schedule cut short
  stays balanced;
- the lr choice over the selection seeds with the tie rule of
  :mod:`~gainsurgery_lab.forgetting.selection` (:meth:`Plan.selection`);
- grid extensions at the edges (:meth:`Plan.front_keys`) and smaller lrs so that every
  chosen point can be read on every other front (:meth:`Plan.matching_keys`).
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from gainsurgery_lab.forgetting import records
from gainsurgery_lab.forgetting.config import Room, RunKey
from gainsurgery_lab.forgetting.methods import MAX_EXPONENT, METHODS, MIN_EXPONENT, lr_label
from gainsurgery_lab.forgetting.selection import Selection, choose


class Plan(Room):
    """What to run next, decided from the records of what has run (see the module docstring)."""

    def __init__(self, exp: Any, runs: Any) -> None:
        super().__init__(exp)
        self.runs = runs

    def dev_score(self, key: RunKey, base: dict[str, Any]) -> float:
        """Mean over stages of the in-domain dev NLL change at the stage's own step (nats/token).

        Lower is better; a failed or unfinished run scores +inf. Only dev windows are
        used: the test windows that are reported never choose anything.
        """
        done = self.runs.stages_done(key)
        if len(done) < len(self.sequence) or done[-1].get("failed"):
            return math.inf
        diffs = []
        for rec in done:
            dom = rec["domain"]
            tok = len(rec["dev_nll"][dom]) * (self.cfg.seq_len - 1)
            diffs.append((sum(rec["dev_nll"][dom]) - sum(base["dev_nll"][dom])) / tok)
        return float(np.mean(diffs))

    def selection(self, method: str, base: dict[str, Any]) -> Selection:
        """The lr choice of ``method``'s default variant: the tie rule over the selection seeds' mean dev score.

        Only lrs where every selection seed has finished count; see :mod:`~gainsurgery_lab.forgetting.selection`.
        """
        variant = METHODS[method].default_variant
        scores: dict[int, list[float]] = {}
        for e in self.tried_exponents(method):
            keys = [RunKey(method, variant, e, s) for s in range(self.cfg.select_seeds)]
            if all(self.runs.is_finished(k) for k in keys):
                scores[e] = [self.dev_score(k, base) for k in keys]
        return choose(scores, self.cfg.select_seeds)

    def _lr_keys(self, method: str, e: int) -> list[RunKey]:
        variant = METHODS[method].default_variant
        return [RunKey(method, variant, e, s) for s in range(self.cfg.select_seeds)]

    def front_keys(self, method: str, base: dict[str, Any]) -> Iterator[RunKey]:
        """The runs of ``method``'s front: its grid at every selection seed, extended at the edges.

        A grid whose best lr is its largest grows by one half-decade above; one whose chosen
        lr (the tie rule's) is its smallest grows by one below. At most ``max_extensions`` lrs
        are added beyond the initial grid, counted over the whole life of the experiment folder
        (a resumed run does not extend again). The caller runs each key before asking for the
        next: extensions depend on results.
        """
        grid0 = self.cfg.grid(method)
        for s in range(self.cfg.select_seeds):  # seed 0 of the whole front first: a cut run stays a front
            for e in grid0:
                yield self._lr_keys(method, e)[s]
        if not METHODS[method].extend:
            return
        while not self.out_of_time():
            tried = sorted(set(grid0) | set(self.tried_exponents(method)))
            for e in tried:  # an extension interrupted by a kill is finished first
                for key in self._lr_keys(method, e):
                    if not self.runs.is_finished(key):
                        yield key
            sel = self.selection(method, base)
            if sel.best is None:
                return
            if sel.best == tried[-1] and len(tried) > 1:
                nxt, why = tried[-1] + 1, f"best lr {lr_label(sel.best)} at the upper edge"
            elif sel.chosen == tried[0] and len(tried) > 1:
                nxt, why = tried[0] - 1, f"chosen lr {lr_label(sel.chosen)} at the lower edge"
            else:
                return
            if len(tried) - len(grid0) >= self.cfg.max_extensions or not MIN_EXPONENT <= nxt <= MAX_EXPONENT:
                self.log(f"{method}: {why} of the grid; not extending further (limit reached)")
                return
            self.log(f"{method}: {why} of the grid; extending to lr {lr_label(nxt)}")
            yield from self._lr_keys(method, nxt)

    def matching_keys(self, method: str, base: dict[str, Any]) -> Iterator[RunKey]:
        """Smaller lrs for ``method`` until its front reaches down to the other methods' chosen points.

        The matched comparison reads each front at another method's chosen in-domain
        change. A front whose smallest lr already adapts more than that point cannot be
        read there (nothing is extrapolated), so it gets one more lr below its smallest
        while that is so. Judged on mean dev scores over the selection seeds, never on the
        reported windows; at most ``max_extensions`` lrs below the initial grid in all (the
        optimum's extensions included). Run after every front method's front.
        """
        floor = max(MIN_EXPONENT, min(self.cfg.grid(method)) - self.cfg.max_extensions)
        while not self.out_of_time():
            sel = self.selection(method, base)
            tried = sorted(sel.mean)
            if not tried:
                return
            lowest = sel.mean[tried[0]]
            others = {}
            for other in self.cfg.front_methods:
                if other == method:
                    continue
                o = self.selection(other, base)
                if o.chosen is not None:
                    others[other] = o.mean[o.chosen]
            short = sorted(o for o, score in others.items() if math.isfinite(lowest) and score > lowest)
            if not short:
                return
            nxt = tried[0] - 1
            if nxt < floor:
                self.log(f"{method}: its smallest lr ({lr_label(tried[0])}) adapts more than the chosen point of "
                         f"{', '.join(short)}; not extending further (limit reached)")
                return
            self.log(f"{method}: its smallest lr ({lr_label(tried[0])}) adapts more than the chosen point of "
                     f"{', '.join(short)}; adding lr {lr_label(nxt)} to compare at matched in-domain change")
            yield from self._lr_keys(method, nxt)

    def tried_exponents(self, method: str) -> list[int]:
        """The lrs (exponents) of ``method``'s default variant that have a seed-0 run folder."""
        variant = METHODS[method].default_variant
        found = []
        runs = self.out / "runs"
        if runs.is_dir() and not runs.is_symlink():
            for p in sorted(runs.iterdir()):
                rel = f"runs/{p.name}/run.json"
                info = records.read(self.out, rel)
                if info is None:
                    continue
                info = records.run_record(info, str(self.out / rel), p.name)
                if info["method"] == method and info["variant"] == variant and info["seed"] == 0:
                    found.append(info["lr_exponent"])
        return found

    def chosen(self, method: str, base: dict[str, Any]) -> int | None:
        """The lr exponent the tie rule picks for ``method`` (see :meth:`selection`)."""
        return self.selection(method, base).chosen

    def probed_lrs(self, method: str, base: dict[str, Any]) -> list[int]:
        """The lrs whose runs get the probes: the chosen one and, when the tie rule moved off it, the best."""
        sel = self.selection(method, base)
        return sorted({e for e in (sel.chosen, sel.best) if e is not None})

    def static_keys(self) -> list[RunKey]:
        """The runs known before any result: the initial grids of the front and extra methods (seed 0).

        Ordered so that a schedule cut short by a deadline stays balanced: the front
        methods before the extras, and within each group the methods interleaved, each
        grid taken from its middle outwards (where the optimum usually is).
        """
        def middle_out(grid: list[int]) -> list[int]:
            mid = (len(grid) - 1) // 2
            order = sorted(range(len(grid)), key=lambda i: (abs(i - mid), i))
            return [grid[i] for i in order]

        keys = []
        extras = [m for m in self.cfg.extra_methods if m not in self.cfg.front_methods]
        for group in (self.cfg.front_methods, extras):
            grids = {m: middle_out(self.cfg.grid(m)) for m in group}
            for s in range(self.cfg.select_seeds):  # every front at seed 0 first, then the next seed
                for i in range(max((len(g) for g in grids.values()), default=0)):
                    keys.extend(RunKey(m, METHODS[m].default_variant, g[i], s) for m, g in grids.items() if i < len(g))
        return keys
