"""The GGUF sink: apply gains to a GGUF BASE, streaming into the GGUF file OUT (and push it).

The engine is :mod:`gainsurgery.formats.gguf` (plan -> measure -> write -> verify);
this module is the sink around it, with the same trust rules as a folder apply,
from the same places:

1. open the base (:func:`~gainsurgery.sources.gguf.opened_gguf`): a local ``.gguf``
   file, an embedded model's or a Hub repo's (pre-checked within limits, opened as a
   regular file);
2. load and stack the gains (:func:`~gainsurgery.applying.gains.load_gains`);
3. plan (pure) and measure (reads the tensors the gains touch): routes, types, errors,
   and each gain's base fingerprint checked — all before OUT is touched;
4. claim OUT (:func:`gainsurgery.io.claims.claim_file`: lock, marked temp file, never
   an input, never a link), write it (:func:`~gainsurgery.formats.gguf.write_gguf`),
   optionally verify every byte, push it with its card, then publish it with a
   no-replace rename (an atomic exchange with ``overwrite``). A failure anywhere
   leaves OUT as it was.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from gainsurgery.errors import CheckpointError, GainSurgeryError, OutputError, PlanError
from gainsurgery.formats.gguf import (DEFAULT_TOLERANCE, GGUFFile, GGUFOptions, GGUFPlan, GGUFVerifyReport, Measured,
                                      is_gguf, make_plan, measure, open_gguf, verify_file, write_gguf)
from gainsurgery.formats.gguf.fingerprint import matching_variant
from gainsurgery.formats.gguf.provenance import build_record, metadata, placeholder, read_record
from gainsurgery.gainfile import GainFile
from gainsurgery.hub.cards import CARD_NAME, gguf_model_card
from gainsurgery.hub.client import HubClient
from gainsurgery.hub.publish import UploadItem, text_item
from gainsurgery.io.checks import check_output
from gainsurgery.io.claims import claim_file
from gainsurgery.io.inputs import show_path
from gainsurgery.applying.gains import LoadedGains, load_gains
from gainsurgery.applying.options import ApplyOptions
from gainsurgery.applying.result import GGUFApplyResult
from gainsurgery.applying.steps import Job, ProgressFactory, Warn, progress_bar, writing
from gainsurgery.sources.gguf import OpenedGGUF, opened_gguf
from gainsurgery.sources.spec import BaseSpec

def check_fingerprints(loaded: LoadedGains, measured: Measured, *, allow_base_mismatch: bool, warn: Warn,
                       written: str = "nothing was written") -> tuple[list[str], dict[str, str]]:
    """Compare each gain's ``base_tensors_sha256`` with the GGUF base dequantized (see :mod:`..fingerprint`).

    Returns ``(labels of the gains that did not match (only when allowed), label -> the dtype that matched)``.

    Raises:
        PlanError: a mismatch, unless ``allow_base_mismatch``.
    """
    mismatched: list[str] = []
    matched: dict[str, str] = {}
    for check in loaded.checks:
        variant = matching_variant(measured.digests, check.keys, check.expected)
        if variant is not None:
            matched[check.label] = variant
            continue
        text = (f"{check.label} was trained on other weights: it records base_tensors_sha256 "
                f"{check.expected[:19]}..., and the base's {len(check.keys)} target tensors, dequantized to "
                "bf16, f16 or f32, give other values (another model or fine-tune, or a GGUF quantized from "
                "other weights)")
        if not allow_base_mismatch:
            raise PlanError(f"{text}; {written}; pass --allow-base-mismatch to apply it anyway")
        warn(text + "; applied anyway (--allow-base-mismatch), recorded in gainsurgery.record")
        mismatched.append(check.label)
    return mismatched, matched


@dataclass
class GGUFPlanned:
    """A GGUF base opened, its gains loaded, the plan made and measured."""

    opened: OpenedGGUF
    loaded: LoadedGains
    plan: GGUFPlan
    measured: Measured

    @property
    def inputs(self) -> list[Any]:
        """The local files read: OUT must keep away from them."""
        return [self.opened.path, *self.loaded.paths]


def gguf_options(options: ApplyOptions) -> GGUFOptions:
    """The GGUF engine's part of the apply options."""
    return GGUFOptions(tolerance=DEFAULT_TOLERANCE if options.requant_tolerance is None else options.requant_tolerance,
                       keep_types=options.keep_types, allow_negative=options.allow_negative,
                       allow_saturation=options.allow_saturation)


def plan_and_measure(opened: OpenedGGUF, gains: Sequence[str | os.PathLike[str] | GainFile], options: GGUFOptions,
                     hub: HubClient | None, progress: ProgressFactory | None) -> GGUFPlanned:
    """Load the gains, plan (routes) and measure (errors, fingerprints) every tensor the gains touch."""
    loaded = load_gains(gains, allow_negative=options.allow_negative, hub=hub)
    plan = make_plan(opened.file, loaded.gain, loaded.sources, options)
    with progress_bar(progress, "measure", plan.bytes_rewritten) as update:
        measured = measure(plan, digest_keys={k for c in loaded.checks for k in c.keys}, progress=update)
    return GGUFPlanned(opened, loaded, plan, measured)


class GGUFSink:
    """Writes the adapted GGUF file OUT (and, with a publisher, pushes it with its card before OUT appears)."""

    @contextlib.contextmanager
    def planned(self, job: Job) -> Iterator[GGUFPlanned]:
        with opened_gguf(job.base, job.hub) as opened:
            yield plan_and_measure(opened, job.gains, gguf_options(job.options), job.hub, job.progress)

    def dry_run(self, job: Job, planned: GGUFPlanned) -> GGUFApplyResult:
        """Plan and measure (routes, types, errors), check OUT and the fingerprints; write nothing."""
        assert job.out is not None
        overwrite = job.options.overwrite
        target = check_output(job.out, inputs=planned.inputs, kind="file", overwrite=overwrite)
        if os.path.lexists(target) and not overwrite:
            raise OutputError(f"OUT already exists: {show_path(job.out)} (pass --overwrite to replace it)")
        check_fingerprints(planned.loaded, planned.measured, allow_base_mismatch=job.options.allow_base_mismatch,
                           warn=job.said.append, written="a run would write nothing")
        return GGUFApplyResult(planned.plan, planned.opened.label, dry_run=True, warnings=job.said,
                               measured=planned.measured, base_bytes=planned.opened.file.size)

    def write(self, job: Job, planned: GGUFPlanned) -> GGUFApplyResult:
        assert job.out is not None
        options, publisher, said = job.options, job.publisher, job.said
        opened, loaded, plan, measured = planned.opened, planned.loaded, planned.plan, planned.measured
        mismatched, matched = check_fingerprints(loaded, measured, allow_base_mismatch=options.allow_base_mismatch,
                                                 warn=said.append)
        for name in loaded.unchecked:
            said.append(f"{name} records no base_tensors_sha256 (made before gainsurgery checked it); "
                        "it cannot be checked against this base's weights")
        for name, sat in measured.saturation().items():
            said.append(f"{name}: {sat.became_inf} weights became ±inf and {sat.became_zero} became 0 "
                        "(--allow-saturation), recorded in gainsurgery.record")
        sha = placeholder()
        record = _record(opened, loaded, plan, measured, sha, mismatched, matched)
        t0 = time.perf_counter()
        with writing(job.out), claim_file(job.out, inputs=planned.inputs, overwrite=options.overwrite) as claim:
            if publisher is not None:
                publisher.prepare()  # a bad token fails before any work
            with progress_bar(job.progress, "apply", opened.file.size) as update:
                written = write_gguf(measured, claim.file, metadata(record), sha_placeholder=sha, progress=update)
            record["base"]["sha256"] = written.base_sha256
            checked = options.verify or publisher is not None
            if checked:
                with open_gguf(claim.tmp, error=OutputError) as o:
                    report = verify_file(measured, o, loaded.sources)
                if not report.ok:
                    raise GainSurgeryError("verification failed, output discarded: " + report.problems[0])
            pushed = None
            if publisher is not None:
                items = gguf_upload_items(claim.tmp, Path(job.out).name, record, written.header_bytes,
                                          base_model=options.base_model or opened.hub_id)
                pushed = publisher.publish_items(items)
            published = claim.publish()
        return GGUFApplyResult(plan, opened.label, published, seconds=time.perf_counter() - t0, provenance=record,
                               verified=checked, pushed=pushed, warnings=said, measured=measured,
                               bytes_written=written.bytes, base_bytes=opened.file.size,
                               base_sha256=written.base_sha256)



def gguf_upload_items(path: Path, name: str, record: dict[str, Any], header_bytes: int, *,
                      base_model: str | None = None) -> list[Any]:
    """What pushing an adapted GGUF uploads: the file under ``name`` and a model card made from its record.

    Only the file's header (``header_bytes``: every key/value, where text can be) is
    scanned for the token before the upload; its tensor data is numbers.

    Raises:
        GainSurgeryError: ``name`` is not a plain ``.gguf`` file name.
    """
    if not is_gguf(name) or name.startswith(".") or "/" in name or not name.isprintable():
        raise GainSurgeryError(f"{show_path(name)}: a GGUF file is pushed under its own name, which must end in "
                               ".gguf and not be hidden; rename it")
    size = os.stat(path).st_size
    return [UploadItem(name, size, local=Path(path), text_bytes=header_bytes),
            text_item(CARD_NAME, gguf_model_card(record, name, base_model=base_model))]


def gguf_upload(path: str | os.PathLike[str], *, base_model: str | None = None) -> list[Any]:
    """The upload of an adapted GGUF file the user names (``gainsurgery push legal.gguf ORG/NAME``).

    Raises:
        CheckpointError: not a GGUF file, or one gainsurgery did not adapt (no record).
    """
    with open_gguf(path) as g:
        record = read_record(g)
        if record is None:
            raise CheckpointError(f"{show_path(path)} carries no gainsurgery.record (not adapted by gainsurgery); "
                                  "upload a plain GGUF with `hf upload`")
        return gguf_upload_items(Path(path), g.name, record, g.data_offset, base_model=base_model)


def _record(opened: OpenedGGUF, loaded: LoadedGains, plan: GGUFPlan, measured: Measured, sha: str,
            mismatched: list[str], matched: dict[str, str]) -> dict[str, Any]:
    """The provenance record (the base's sha256 still the placeholder ``sha``)."""
    extra: dict[str, Any] = {}
    sat = measured.saturation()
    if sat:
        extra["saturation_allowed"] = {n: {"became_inf": s.became_inf, "became_zero": s.became_zero}
                                       for n, s in sorted(sat.items())}
    if mismatched:
        extra["base_mismatch_allowed"] = mismatched
    if loaded.unchecked:
        extra["base_not_checked"] = list(loaded.unchecked)
    if matched:
        extra["base_checked"] = {label: f"base_tensors_sha256 of the base dequantized to {variant}"
                                 for label, variant in matched.items()}
    try:
        parent = read_record(opened.file)
    except CheckpointError as exc:
        parent = {"unreadable": str(exc)[:200]}
    options = plan.options.as_dict()
    options["allow_saturation"] = bool(sat)
    return build_record(base={**opened.provenance(), "sha256": sha}, gains=loaded.sources, options=options,
                        tensors=[r.as_dict() for r in measured.reports.values()], routes=plan.routes(),
                        extra=extra, base_record=parent)


def verify_gguf(base: str | os.PathLike[str] | BaseSpec, gains: Sequence[str | os.PathLike[str] | GainFile],
                out: str | os.PathLike[str], *, allow_negative: bool = False, hub: HubClient | None = None,
                progress: ProgressFactory | None = None) -> GGUFVerifyReport:
    """Check that the GGUF file ``out`` is exactly ``base`` with ``gains`` applied.

    The routes are recomputed with the options ``out`` records (tolerance, ``keep_types``,
    saturation allowed), so every rewritten tensor is compared byte for byte; every other
    tensor and key/value must be the base's.

    Example:
        >>> verify_gguf("base.gguf", ["legal.safetensors"], "legal.gguf").ok  # doctest: +SKIP
        True
    """
    with opened_gguf(base, hub) as opened, open_gguf(out) as o:
        options = _recorded_options(o, allow_negative)
        planned = plan_and_measure(opened, gains, options, hub, None)
        with progress_bar(progress, "verify", opened.file.size) as update:
            return verify_file(planned.measured, o, planned.loaded.sources, progress=update)


def _recorded_options(o: GGUFFile, allow_negative: bool) -> GGUFOptions:
    """The options an adapted file says it was made with (defaults when it says nothing usable)."""
    try:
        record = read_record(o) or {}
    except CheckpointError:
        record = {}
    opts = record.get("options") if isinstance(record.get("options"), dict) else {}
    tol = opts.get("tolerance")
    tolerance = float(tol) if isinstance(tol, (int, float)) and not isinstance(tol, bool) and math.isfinite(tol) \
        and tol >= 0 else GGUFOptions().tolerance
    return GGUFOptions(tolerance=tolerance, keep_types=opts.get("keep_types") is True,
                       allow_negative=allow_negative, allow_saturation=opts.get("allow_saturation") is True)
