"""Choosing a method's learning rate: the mean dev score over seeds, and a tie rule fixed in advance.

Every lr of a front runs with ``select_seeds`` seeds. A method's dev score at an lr is
the mean over those seeds of :meth:`~gainsurgery_lab.forgetting.runner.Experiment.dev_score`
(in-domain dev NLL change, nats/token, lower is better; it never sees forgetting nor a
reported window). The **best** lr has the lowest mean. The **chosen** lr is

    the smallest lr whose mean dev score is within one seed standard deviation of the
    best mean (the sd over the selection seeds at the best lr),

so that a difference the seeds cannot resolve never buys a larger step: a larger lr
moves the model more, and forgets more, for nothing the dev windows can tell apart.
The rule was written down before any forgetting number of these runs was looked at,
and it is applied to every method alike. With one seed the sd is 0 and the chosen lr
is the best one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

TIE_RULE = ("the smallest lr whose mean dev score over the selection seeds is within one seed sd "
            "(at the best lr) of the best mean")


@dataclass(frozen=True)
class Selection:
    """The lr choice of one method, with everything needed to judge it.

    Attributes:
        scores: lr exponent -> dev score of each selection seed (nats/token; inf: failed).
        mean: lr exponent -> mean over the seeds (only lrs where every seed finished).
        sd: lr exponent -> sd over the seeds (ddof 1; 0 with one seed).
        best: the lr exponent of the lowest mean (None: nothing finished).
        chosen: the lr exponent the tie rule picks.
        threshold: best mean + sd at the best lr: every lr at or below it ties with the best.
    """

    scores: dict[int, list[float]]
    mean: dict[int, float] = field(default_factory=dict)
    sd: dict[int, float] = field(default_factory=dict)
    best: int | None = None
    chosen: int | None = None
    threshold: float = math.nan

    @property
    def sd_best(self) -> float:
        return self.sd.get(self.best, math.nan) if self.best is not None else math.nan

    @property
    def margin(self) -> float:
        """How much worse the chosen lr's mean is than the best's (0 when they are the same lr)."""
        if self.best is None or self.chosen is None:
            return math.nan
        return self.mean[self.chosen] - self.mean[self.best]

    def neighbours(self, e: int) -> dict[str, int | None]:
        """The next smaller and larger lrs of the front around ``e``."""
        lrs = sorted(self.mean)
        i = lrs.index(e)
        return {"smaller": lrs[i - 1] if i > 0 else None, "larger": lrs[i + 1] if i + 1 < len(lrs) else None}

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (exponents as keys of strings)."""
        finite = lambda x: x if math.isfinite(x) else None  # noqa: E731
        return {"rule": TIE_RULE, "best": self.best, "chosen": self.chosen,
                "threshold": finite(self.threshold), "sd_at_best": finite(self.sd_best),
                "margin": finite(self.margin),
                "per_lr": {str(e): {"per_seed": [finite(v) for v in self.scores[e]], "mean": finite(self.mean[e]),
                                    "sd": finite(self.sd[e])} for e in sorted(self.mean)}}


def choose(scores: Mapping[int, Sequence[float]], seeds: int) -> Selection:
    """Apply the tie rule (module docstring) to ``scores``: lr exponent -> dev score per seed.

    Only lrs with at least ``seeds`` scores count (a front still running is judged on
    what has finished at every seed); an lr where any seed failed (inf) is never chosen.

    Example:
        >>> s = choose({-5: [-0.16, -0.15], -4: [-0.26, -0.25], -3: [-0.27, -0.23]}, seeds=2)
        >>> s.best, s.chosen
        (-4, -4)
        >>> choose({-5: [-0.24, -0.26], -4: [-0.26, -0.25], -3: [-0.27, -0.23]}, seeds=2).chosen
        -5
    """
    scores = {e: [float(x) for x in v[:seeds]] for e, v in scores.items() if len(v) >= seeds}
    mean = {e: float(np.mean(v)) for e, v in scores.items()}
    sd = {e: float(np.std(v, ddof=1)) if len(v) > 1 and all(map(math.isfinite, v)) else
          (0.0 if all(map(math.isfinite, v)) else math.inf) for e, v in scores.items()}
    finite = sorted(e for e in mean if math.isfinite(mean[e]))
    if not finite:
        return Selection(scores, mean, sd)
    best = min(finite, key=lambda e: (mean[e], e))
    threshold = mean[best] + sd[best]
    chosen = min(e for e in finite if mean[e] <= threshold)
    return Selection(scores, mean, sd, best, chosen, threshold)
