"""What a check found: a record of counts and problems, ``ok`` only when there are none."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class ProblemReport:
    """Base of the verification reports: ``problems`` (one line each) and the counts a subclass adds.

    Example:
        >>> ProblemReport().ok, ProblemReport(problems=["shard 1: 3 bytes differ"]).as_dict()
        (True, {'ok': False, 'problems': ['shard 1: 3 bytes differ']})
    """

    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing was found wrong."""
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``ok``, the counts in the order declared, then ``problems``."""
        counts = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "problems"}
        return {"ok": self.ok, **counts, "problems": self.problems}
