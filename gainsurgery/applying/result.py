"""What an apply did: :class:`ApplyResult`, the one result every sink returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gainsurgery.formats.gguf import Measured


@dataclass
class ApplyResult:
    """What :func:`gainsurgery.api.apply` did (or, for a dry run, would do).

    Attributes:
        plan: the plan (a :class:`~gainsurgery.merge.plan.Plan`: tensors touched, bytes
            rewritten and copied; for a GGUF base, a :class:`~gainsurgery.formats.gguf.GGUFPlan`).
        base: the base as plans show it (a Hub reference or the local folder or file).
        out: the output folder (or GGUF file), resolved; None for a dry run or a Hub-to-Hub apply.
        dry_run: True when nothing was written.
        seconds: wall time from claiming OUT to publishing it, in seconds.
        shard_sha256: shard name -> sha256 of the written shard.
        provenance: the record written beside the weights (``gainsurgery.json``; in a GGUF
            file, its ``gainsurgery.record`` metadata).
        verified: True when every byte was verified before OUT appeared (or, without OUT, before the commit).
        pushed: what the publisher returned (a :class:`~gainsurgery.hub.publish.PushResult`), if anything.
        warnings: the one-line warnings given (gains without a base fingerprint, allowed mismatches...).
        transfer: a dry run without OUT: what the Hub-to-Hub apply would move and the disk it needs
            (:meth:`~gainsurgery.applying.hub_sink.TransferPlan.as_dict`).
        resumed: without OUT: the shards an earlier, killed run had uploaded (nothing downloaded or sent).
        peak_disk_bytes: without OUT: the most the work folder held, in bytes.
    """

    plan: Any
    base: str
    out: Path | None = None
    dry_run: bool = False
    seconds: float = 0.0
    shard_sha256: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    verified: bool = False
    pushed: Any = None
    warnings: list[str] = field(default_factory=list)
    transfer: dict[str, Any] | None = None
    resumed: list[str] = field(default_factory=list)
    peak_disk_bytes: int | None = None


@dataclass
class GGUFApplyResult(ApplyResult):
    """An :class:`ApplyResult` on a GGUF base: the routes and errors measured per tensor, and sizes.

    Attributes:
        measured: every rewritten tensor's report (route, types, errors).
        bytes_written: the output's size, in bytes.
        base_bytes: the base's size, in bytes.
        base_sha256: the base's sha256 (hex; empty for a dry run).
    """

    measured: Measured | None = None
    bytes_written: int = 0
    base_bytes: int = 0
    base_sha256: str = ""

    @property
    def record(self) -> dict[str, Any]:
        """The provenance written into the file (its ``gainsurgery.record`` metadata)."""
        return self.provenance

    def summary(self) -> dict[str, Any]:
        """JSON-ready: routes per gain key, a report per rewritten tensor, sizes."""
        assert self.measured is not None
        reports = [r.as_dict() for r in self.measured.reports.values()]
        out_bytes = self.bytes_written or self.expected_bytes()
        return {"base": self.base, "format": "gguf", "out": str(self.out) if self.out else None,
                "dry_run": self.dry_run, "tensors_total": len(self.plan.base.tensors),
                "tensors_touched": len(self.plan.ops), "gain_parameters": self.plan.gain.num_parameters,
                "bytes_base": self.base_bytes, "bytes_out": out_bytes,
                "size_ratio": round(out_bytes / self.base_bytes, 6) if self.base_bytes else None,
                "bytes_rewritten": self.plan.bytes_rewritten, "routes": self.plan.routes(), "tensors": reports,
                "verified": self.verified, "seconds": round(self.seconds, 3), "base_sha256": self.base_sha256,
                **({"pushed": self.pushed.as_dict()} if self.pushed is not None else {})}

    def expected_bytes(self) -> int:
        """The output's size in bytes, computed from the base's (for a dry run)."""
        assert self.measured is not None
        g = self.plan.base
        delta = sum(self.measured.out_nbytes(t) - t.nbytes for t in g.tensors)
        return g.size + delta
