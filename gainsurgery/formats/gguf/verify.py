"""Verifying an adapted GGUF against its base and gains: every byte accounted for.

:func:`verify_file` checks an output file against a measured plan (the routes and
types the options recorded in the file give):

- the header: version 3; every key/value of the base, in order, with the same type
  and the same bytes (the base's own ``gainsurgery.*`` keys excepted: they are
  replaced), then exactly the provenance keys; the tensors in the base's order with
  the base's names and shapes, and the types their routes give;
- the data: every untouched tensor byte-identical to the base; every rewritten
  tensor equal, byte for byte, to what its route computes from the base (routes are
  deterministic); zero padding; the file's size;
- the provenance: the gains' sha256 and names, and the base's sha256 (hashed here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from gainsurgery.errors import GainSurgeryError
from gainsurgery.formats.gguf.engine import CHUNK_ELEMS, Measured, output_chunks
from gainsurgery.formats.gguf.opening import PSEUDO_KEYS, GGUFFile
from gainsurgery.formats.gguf.provenance import (KEY_BASE_SHA256, KEY_GAIN_NAMES, KEY_GAIN_SHA256, is_ours,
                                                 read_record)
from gainsurgery.formats.gguf.writer import raw_value, sha256_of
from gainsurgery.reports import ProblemReport

_STEP = 16 << 20


@dataclass
class GGUFVerifyReport(ProblemReport):
    """What :func:`verify_file` found.

    Attributes:
        problems: one line per mismatch (empty when the file is exact).
        tensors_checked: tensors compared.
        tensors_scaled: tensors rewritten by the gains (recomputed and compared).
        keys_checked: key/values compared.
    """

    tensors_checked: int = 0
    tensors_scaled: int = 0
    keys_checked: int = 0


def verify_file(measured: Measured, out: GGUFFile, gains: list[dict[str, Any]], *,
                chunk_elems: int = CHUNK_ELEMS, progress: Callable[[int], Any] | None = None,
                max_problems: int = 100) -> GGUFVerifyReport:
    """Check the GGUF ``out`` against ``measured`` (see the module docstring).

    Args:
        measured: the plan and routes measured from the base and the gains.
        out: the file to check (opened with :func:`~gainsurgery.formats.gguf.opening.open_gguf`).
        gains: the gains' provenance entries (name, sha256), in the order applied.
    """
    base = measured.plan.base
    report = GGUFVerifyReport()
    problems = report.problems

    def problem(text: str) -> None:
        if len(problems) < max_problems:
            problems.append(text)

    if out.version != 3:
        problem(f"GGUF version {out.version}, expected 3")
    if out.alignment != base.alignment:
        problem(f"alignment {out.alignment}, the base has {base.alignment}")
    kept = [k for k in base.keys if not is_ours(k)]
    theirs = [k for k in out.keys if not is_ours(k)]
    if theirs != kept:
        missing = [k for k in kept if k not in theirs]
        extra = [k for k in theirs if k not in kept]
        problem(f"key/values differ from the base's: missing {missing[:5]}, added {extra[:5]}"
                if missing or extra else "key/values are not in the base's order")
    for key in kept:
        if key in out.keys and key not in PSEUDO_KEYS:
            report.keys_checked += 1
            if raw_value(base, key) != raw_value(out, key):
                problem(f"key/value {key!r} differs from the base's")
    _check_provenance(out, gains, base, problem)

    names = [t.name for t in out.tensors]
    if names != [t.name for t in base.tensors]:
        problem("the tensors are not the base's, in the base's order")
        return report
    expected_end = out.data_offset
    for entry in base.tensors:
        o = out.by_name[entry.name]
        report.tensors_checked += 1
        want_type = measured.out_type(entry.name)
        if o.ne != entry.ne or o.type_name != want_type:
            problem(f"{entry.name}: {o.type_name} {list(o.ne)}, expected {want_type} {list(entry.ne)}")
            continue
        if o.offset != expected_end:
            problem(f"{entry.name}: data at byte {o.offset}, expected {expected_end} (not contiguous)")
        padded = -(-o.nbytes // out.alignment) * out.alignment
        pad = out.read(o.offset + o.nbytes, padded - o.nbytes) if o.offset + padded <= out.size else b"\x01"
        if pad.strip(b"\x00"):
            problem(f"{entry.name}: the padding after it is not zeros")
        expected_end = o.offset + padded
        op = measured.plan.ops.get(entry.name)
        if op is None:
            if not _same_bytes(base, entry.offset, out, o.offset, entry.nbytes):
                problem(f"{entry.name}: differs from the base, but no gain touches it")
        else:
            report.tensors_scaled += 1
            pos = o.offset
            for chunk in output_chunks(base, op, want_type, chunk_elems):
                data = np.ascontiguousarray(chunk).tobytes()
                if out.read(pos, len(data)) != data:
                    problem(f"{entry.name}: differs from its route ({op.route}, {want_type}) recomputed from the "
                            "base and the gains")
                    break
                pos += len(data)
        if progress is not None:
            progress(entry.nbytes)
    if out.size != expected_end:
        problem(f"the file is {out.size} bytes, expected {expected_end}")
    return report


def _same_bytes(a: GGUFFile, a_at: int, b: GGUFFile, b_at: int, count: int) -> bool:
    done = 0
    while done < count:
        n = min(_STEP, count - done)
        if os.pread(a.file.fileno(), n, a_at + done) != os.pread(b.file.fileno(), n, b_at + done):
            return False
        done += n
    return True


def _check_provenance(out: GGUFFile, gains: list[dict[str, Any]], base: GGUFFile,
                      problem: Callable[[str], None]) -> None:
    try:
        record = read_record(out)
    except GainSurgeryError as exc:
        problem(str(exc))
        return
    if record is None:
        problem("no gainsurgery provenance (gainsurgery.record) in the file")
        return
    recorded = out.field(KEY_GAIN_SHA256)
    shas = [bytes(recorded.parts[i]).decode("ascii", "replace") for i in recorded.data] if recorded else []
    if shas != [str(g.get("sha256", "")) for g in gains]:
        problem("the gains' sha256 recorded in the file are not those of the gain files given")
    recorded_names = out.field(KEY_GAIN_NAMES)
    names = [bytes(recorded_names.parts[i]).decode("utf-8", "replace") for i in recorded_names.data] \
        if recorded_names else []
    if names != [str(g.get("name", "")) for g in gains]:
        problem("the gains' names recorded in the file are not those of the gain files given")
    base_sha = out.string(KEY_BASE_SHA256)
    if base_sha != sha256_of(base) or (record.get("base") or {}).get("sha256") != base_sha:
        problem("the base sha256 recorded in the file is not the base's")
