"""Measuring and computing the rewritten tensors of a GGUF apply, chunk by chunk in bounded memory.

:func:`measure` runs before anything is written. For every tensor of the plan it
computes, from the base bytes, the exact float32 target (the dequantized weights
times the gains) and what its route gives, and reports per tensor the RMS of the
gain's own change, of the error the route adds, and the tensor's own quantization
error (uniform-rounding estimate from its steps). A ``requantize`` tensor is tried
type by type along its ladder (its own type first); the first type whose added
error stays within the tolerance is kept, so every output type is known before the
header is written. It also hashes the base tensors the gains' fingerprints cover
(:mod:`.fingerprint`).

:func:`output_chunks` yields a rewritten tensor's output bytes; the writer streams
them into the file and ``verify`` compares them with a file: the same deterministic
computation both times. Work arrays hold at most ``chunk_elems`` weights (float32)
at a time, whatever the tensor's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from gainsurgery.errors import PlanError
from gainsurgery.formats.gguf.fingerprint import DigestSet
from gainsurgery.formats.gguf.opening import GGUFFile, TensorEntry
from gainsurgery.formats.gguf.plan import GGUFPlan, TensorOp
from gainsurgery.formats.gguf.quants import (CODECS, Saturation, block_sizes, dequantize, encode, fold_rows,
                                             own_error)

#: float32 weights held per working chunk (each route holds a few arrays this size).
CHUNK_ELEMS = 1 << 21

#: Reports progress: (what, bytes done).
Progress = Callable[[int], Any]


@dataclass
class TensorReport:
    """What a route did to one tensor (RMS values in weight units, over all its weights).

    Attributes:
        name: the GGUF tensor.
        route: ``float``, ``fold`` or ``requantize``.
        type_in: its type in the base.
        type_out: its type in the output (differs only when a re-quantized tensor was promoted).
        weights: number of weights.
        bytes_in: bytes in the base.
        bytes_out: bytes in the output.
        weight_rms: RMS of the base weights (dequantized).
        change_rms: RMS of the gain's own change (target minus base): what the gain means to do.
        added_rms: RMS of the error the route adds (output minus target).
        own_rms: the base tensor's own quantization error, estimated as step / sqrt(12); None
            for float tensors and non-uniform grids (IQ and ternary types).
        tried: for ``requantize``, added RMS per type tried, in order (a type abandoned
            once its error exceeded the tolerance shows the error so far, a lower bound).
        saturation: weights (or blocks) taken out of range.
        note: why this route.
        keys: the gain keys behind it.
    """

    name: str
    route: str
    type_in: str
    type_out: str
    weights: int
    bytes_in: int
    bytes_out: int
    weight_rms: float = 0.0
    change_rms: float = 0.0
    added_rms: float = 0.0
    own_rms: float | None = None
    tried: dict[str, float] = field(default_factory=dict)
    saturation: Saturation = field(default_factory=Saturation)
    note: str = ""
    keys: list[str] = field(default_factory=list)

    @property
    def added_vs_change(self) -> float:
        """The added error as a fraction of the gain's own change (0 when both are 0)."""
        if self.change_rms == 0:
            return 0.0 if self.added_rms == 0 else math.inf
        return self.added_rms / self.change_rms

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for reports and provenance."""
        out = {"tensor": self.name, "route": self.route, "type": self.type_in, "type_out": self.type_out,
               "weights": self.weights, "bytes": self.bytes_in, "bytes_out": self.bytes_out,
               "weight_rms": _num(self.weight_rms), "change_rms": _num(self.change_rms),
               "added_rms": _num(self.added_rms), "own_quant_rms": _num(self.own_rms),
               "added_vs_change": _num(self.added_vs_change), "keys": self.keys, "note": self.note}
        if self.tried:
            out["tried"] = {k: _num(v) for k, v in self.tried.items()}
        if self.saturation:
            out["saturation"] = {"became_inf": self.saturation.became_inf,
                                 "became_zero": self.saturation.became_zero}
        return out


def _num(value: float | None) -> float | str | None:
    if value is None:
        return None
    if not math.isfinite(value):
        return "inf"
    return float(f"{value:.6g}")


@dataclass
class Measured:
    """What :func:`measure` found.

    Attributes:
        plan: the plan measured.
        reports: GGUF tensor name -> its report, in file order.
        digests: gain key -> the base tensor's digests (see :mod:`.fingerprint`).
    """

    plan: GGUFPlan
    reports: dict[str, TensorReport]
    digests: dict[str, DigestSet]

    def out_type(self, name: str) -> str:
        """The output type of a GGUF tensor (its own type unless a route changed it)."""
        report = self.reports.get(name)
        return report.type_out if report is not None else self.plan.base.by_name[name].type_name

    def out_nbytes(self, entry: TensorEntry) -> int:
        """The output size of a tensor, in bytes."""
        report = self.reports.get(entry.name)
        return report.bytes_out if report is not None else entry.nbytes

    def saturation(self) -> dict[str, Saturation]:
        """Tensors whose route took weights out of range."""
        return {n: r.saturation for n, r in self.reports.items() if r.saturation}


def rows_per_chunk(entry: TensorEntry, chunk_elems: int = CHUNK_ELEMS) -> int:
    """Rows of a tensor processed together."""
    return max(1, chunk_elems // max(1, entry.ne[0]))


def read_rows(g: GGUFFile, entry: TensorEntry, first: int, count: int) -> np.ndarray:
    """Rows ``first .. first+count`` of a tensor's raw bytes, ``(count, row_bytes)`` uint8."""
    rb = entry.row_bytes
    raw = g.read(entry.offset + first * rb, count * rb)
    return np.frombuffer(raw, dtype=np.uint8).reshape(count, rb)


def _chunks(entry: TensorEntry, chunk_elems: int) -> Iterator[tuple[int, int]]:
    step = rows_per_chunk(entry, chunk_elems)
    for first in range(0, entry.rows, step):
        yield first, min(step, entry.rows - first)


def transform(op: TensorOp, raw: np.ndarray, first: int, type_out: str,
              base: np.ndarray | None = None) -> tuple[np.ndarray, Saturation]:
    """The output bytes of rows ``first...`` of ``op``'s tensor (raw base bytes ``raw``) in ``type_out``.

    ``base``: those rows already dequantized (saves dequantizing them again).
    """
    entry = op.entry
    if op.route == "fold":
        return fold_rows(raw, entry.type_name, op.rows[first:first + raw.shape[0]])  # type: ignore[index]
    if base is None:
        base = dequantize(raw, entry.type_name, entry.ne[0])
    old = raw if type_out == entry.type_name else None
    return encode(op.target(base, first), type_out, old=old)


def output_chunks(g: GGUFFile, op: TensorOp, type_out: str, chunk_elems: int = CHUNK_ELEMS
                  ) -> Iterator[np.ndarray]:
    """The output bytes of ``op``'s tensor, chunk by chunk (``(rows, row_bytes)`` uint8 arrays)."""
    for first, count in _chunks(op.entry, chunk_elems):
        out, _ = transform(op, read_rows(g, op.entry, first, count), first, type_out)
        yield out


def measure(plan: GGUFPlan, *, digest_keys: set[str] | frozenset[str] = frozenset(),
            chunk_elems: int = CHUNK_ELEMS, progress: Progress | None = None) -> Measured:
    """Measure every route of ``plan`` and choose re-quantized types (see the module docstring).

    Raises:
        PlanError: a route takes weights out of range (±inf, or non-zero to 0) and
            ``allow_saturation`` is off; nothing has been written.
    """
    g, opts = plan.base, plan.options
    reports: dict[str, TensorReport] = {}
    for name, op in plan.ops.items():
        reports[name] = _measure_op(g, op, opts.tolerance, chunk_elems, progress)
        sat = reports[name].saturation
        if sat and not opts.allow_saturation:
            raise PlanError(f"{name}: {sat.became_inf} finite weights became ±inf and {sat.became_zero} non-zero "
                            f"weights became 0 once scaled and stored as {reports[name].type_out} (the gains take "
                            "them out of its range); nothing was written; pass --allow-saturation to write it anyway")
    digests = {}
    for key in sorted(digest_keys):
        entry = g.by_name[plan.keys[key]]
        digests[key] = digest_tensor(g, entry, chunk_elems)
    return Measured(plan, reports, digests)


def _measure_op(g: GGUFFile, op: TensorOp, tolerance: float, chunk_elems: int,
                progress: Progress | None) -> TensorReport:
    entry = op.entry
    n = entry.n_elements
    requant = op.route == "requantize"
    # One pass gives the base's size, the gain's change, the tensor's own error and, for a
    # route with one candidate (float, fold), that candidate's error too. Re-quantization
    # needs the whole change first (the tolerance is relative to it), then tries its ladder.
    weight2 = change2 = added2 = 0.0
    own2: float | None = 0.0
    sat = Saturation()
    codec = CODECS.get(entry.type_name) if op.route == "fold" else None
    for first, count in _chunks(entry, chunk_elems):
        raw = read_rows(g, entry, first, count)
        if codec is not None:  # unpack the levels once: the fold leaves them as they are
            blocks = raw.reshape(-1, entry.nbytes // max(1, entry.n_elements // codec.block))
            params, levels = codec.unpack(blocks)
            base = codec.values(params, levels).reshape(count, entry.ne[0])
        else:
            base = dequantize(raw, entry.type_name, entry.ne[0])
        target = op.target(base, first)
        weight2 += _sum_squares(base)
        change2 += _sum_squares(target - base)
        own = own_error(raw, entry.type_name)
        own2 = None if own is None or own2 is None else own2 + own[0]
        if not requant:
            out, s = transform(op, raw, first, entry.type_name, base)
            if codec is not None:
                folded = codec.values(codec.scales(out.reshape(blocks.shape)), levels).reshape(target.shape)
                added2 += _squared_diff(folded, target)
            else:
                added2 += _squared_error(out, entry.type_name, target)
            sat.add(s)
    report = TensorReport(entry.name, op.route, entry.type_name, entry.type_name, n, entry.nbytes, entry.nbytes,
                          weight_rms=math.sqrt(weight2 / n), change_rms=math.sqrt(change2 / n),
                          own_rms=None if own2 is None else math.sqrt(own2 / n), note=op.note, keys=list(op.keys),
                          added_rms=math.sqrt(added2 / n), saturation=sat)
    if requant:
        budget = tolerance * tolerance * change2
        # Small chunks while trying types: a type that fails usually shows it in the first one.
        trial_elems = max(1, chunk_elems // 8)
        for i, type_out in enumerate(op.ladder):
            last = i == len(op.ladder) - 1
            added2, sat, complete = _added_error(g, op, type_out, trial_elems, None if last else budget)
            report.tried[type_out] = math.sqrt(added2 / n)
            if sat and not last:
                continue  # a type that cannot hold the scaled weights (float16 overflow): try the next one
            if complete and (last or added2 <= budget):
                report.type_out, report.added_rms, report.saturation = type_out, math.sqrt(added2 / n), sat
                break
        if report.type_out != entry.type_name:
            block, size = block_sizes(report.type_out)
            report.bytes_out = n // block * size
    if progress is not None:
        progress(entry.nbytes)
    return report


def _sum_squares(values: np.ndarray) -> float:
    """Sum of squares of float32 values (a BLAS dot product: the reports need 4 digits, not 16)."""
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    return float(np.dot(flat, flat))


def _squared_error(out: np.ndarray, type_out: str, target: np.ndarray) -> float:
    """Sum of squared (stored - target) over finite stored weights (±inf is counted as saturation instead)."""
    return _squared_diff(dequantize(out, type_out, target.shape[1]), target)


def _squared_diff(back: np.ndarray, target: np.ndarray) -> float:
    with np.errstate(over="ignore", invalid="ignore"):
        diff = back - target
    if not np.isfinite(diff).all():
        diff = np.where(np.isfinite(diff), diff, 0.0)
    return _sum_squares(diff)


def _added_error(g: GGUFFile, op: TensorOp, type_out: str, chunk_elems: int,
                 budget: float | None) -> tuple[float, Saturation, bool]:
    """Sum of squared (output - target) over the tensor; stops early once past ``budget`` (then incomplete)."""
    entry = op.entry
    added2 = 0.0
    sat = Saturation()
    for first, count in _chunks(entry, chunk_elems):
        raw = read_rows(g, entry, first, count)
        base = dequantize(raw, entry.type_name, entry.ne[0])
        out, s = transform(op, raw, first, type_out, base)
        added2 += _squared_error(out, type_out, op.target(base, first))
        sat.add(s)
        if budget is not None and added2 > budget:
            return added2, sat, False
    return added2, sat, True


def digest_tensor(g: GGUFFile, entry: TensorEntry, chunk_elems: int = CHUNK_ELEMS) -> DigestSet:
    """A base tensor's digests as the checkpoint dequantizing it to each float dtype would hold it."""
    digests = DigestSet(entry.shape)
    for first, count in _chunks(entry, chunk_elems):
        digests.update(dequantize(read_rows(g, entry, first, count), entry.type_name, entry.ne[0]))
    return digests


__all__ = ["CHUNK_ELEMS", "Measured", "TensorReport", "digest_tensor", "measure", "output_chunks", "read_rows",
           "rows_per_chunk", "transform"]
