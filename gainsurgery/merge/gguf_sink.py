"""Apply, verify, targets and inspect with a GGUF file as BASE: the GGUF sink of an apply.

The engine is :mod:`gainsurgery.formats.gguf` (plan -> measure -> write -> verify);
this module is the orchestration around it, with the same trust rules as a folder
apply, from the same places:

1. open the base (:func:`opened_gguf`): a local ``.gguf`` file (pre-checked within
   limits, opened as a regular file);
2. load and stack the gains (:func:`gainsurgery.merge.load_gains`);
3. plan (pure) and measure (reads the tensors the gains touch): routes, types, errors,
   and each gain's base fingerprint checked — all before OUT is touched;
4. claim OUT (:func:`gainsurgery.io.claims.claim_file`: lock, marked temp file, never
   an input, never a link), write it (:func:`~gainsurgery.formats.gguf.write_gguf`),
   optionally verify every byte, then publish it with a no-replace rename (an atomic
   exchange with ``overwrite``). A failure anywhere leaves OUT as it was.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from gainsurgery.errors import GainSurgeryError, OutputError, PlanError
from gainsurgery.formats.gguf import (GGUFFile, GGUFOptions, GGUFPlan, GGUFVerifyReport, Measured, is_gguf,
                                      make_plan, measure, open_gguf, verify_file, write_gguf)
from gainsurgery.formats.gguf.fingerprint import matching_variant
from gainsurgery.formats.gguf.provenance import build_record, metadata, placeholder, read_record
from gainsurgery.gainfile import GainFile
from gainsurgery.io.inputs import show_path
from gainsurgery.io.checks import check_output
from gainsurgery.io.claims import claim_file
from gainsurgery.merge import LoadedGains, _writing, load_gains

if TYPE_CHECKING:
    from gainsurgery.hub.client import HubClient

#: Makes a progress bar from a description and a total in bytes (``tqdm`` fits).
ProgressFactory = Callable[[str, int], Any]
Warn = Callable[[str], None]


@dataclass
class OpenedGGUF:
    """A GGUF base, opened, and what provenance says about where it came from.

    Attributes:
        spec: the BASE argument as given.
        file: the opened, pre-checked file.
        path: the local file it is read from.
        facts: where it came from beyond the file itself (a Hub repo and commit, an embedded model).
    """

    spec: str
    file: GGUFFile
    path: Path
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The base as messages show it."""
        return self.spec

    @property
    def hub_id(self) -> str | None:
        """The Hub repo the base comes from, if any (a card's ``base_model``)."""
        return self.facts.get("hub")

    def provenance(self) -> dict[str, Any]:
        """What the record says about the base (its file name, never its folder)."""
        return {"name": self.file.name, "bytes": self.file.size, **self.facts}


@contextlib.contextmanager
def opened_gguf(spec: str | os.PathLike[str], hub: HubClient | None = None) -> Iterator[OpenedGGUF]:
    """Open a GGUF BASE: ``with opened_gguf("model.gguf") as base: ...``.

    ``spec`` is a local ``.gguf`` file; ``embedded:NAME.gguf``, an embedded model's
    original GGUF (assembled once into the cache, its sha256 checked by its package);
    or ``ORG/NAME[@REV]:path/model.gguf``, a file of a Hub repo, downloaded into the
    Hugging Face cache. Anything that reads like a local path is never sent to the Hub.

    Raises:
        CheckpointError: missing, not a GGUF file, outside the limits.
        HubError: a Hub file cannot be downloaded.
    """
    from gainsurgery.errors import CheckpointError
    from gainsurgery.hub.refs import parse_file_ref
    from gainsurgery.io.inputs import EMBEDDED_PREFIX

    text = os.fspath(spec)
    facts: dict[str, Any] = {}
    if text.startswith(EMBEDDED_PREFIX):
        from gainsurgery.sources.embedded import GGUF_SUFFIX, embedded_gguf, embedded_model

        name = text[len(EMBEDDED_PREFIX):]
        model = embedded_model(name[: -len(GGUF_SUFFIX)] if name.endswith(GGUF_SUFFIX) else name)
        path = embedded_gguf(model.name)
        facts = {**model.facts(), "embedded": text, "description": f"{model.upstream} (the original GGUF file)"}
    else:
        path = Path(os.path.expanduser(text))
        ref = None if os.path.lexists(path) else parse_file_ref(text)
        if ref is not None:
            from gainsurgery.hub.client import HubClient
            from gainsurgery.sources import fetch_gain_file

            path = fetch_gain_file(ref, hub if hub is not None else HubClient.from_env())
            facts = {"hub": ref.repo_id, "revision": ref.revision or "main", "path": ref.path}
            parts = path.parts
            if "snapshots" in parts[:-1]:
                facts["commit"] = parts[parts.index("snapshots") + 1]
        elif not os.path.lexists(path):
            raise CheckpointError(f"no such file: {show_path(text)} (a GGUF BASE is a .gguf file, "
                                  "embedded:NAME.gguf or ORG/NAME[@REV]:path/model.gguf)")
    with open_gguf(path) as g:
        yield OpenedGGUF(text, g, path, facts)


@dataclass
class GGUFApplyResult:
    """What :func:`apply_gguf` did.

    Attributes:
        plan: the plan (routes per gain key).
        measured: every rewritten tensor's report.
        base: the base as given.
        out: the output file (None for a dry run).
        dry_run: True when nothing was written.
        seconds: wall time from claiming OUT to publishing it.
        bytes_written: the output's size.
        base_bytes: the base's size.
        base_sha256: the base's sha256 (hex; empty for a dry run).
        record: the provenance written into the file.
        verified: True when every byte was verified before OUT appeared.
        warnings: the one-line warnings given.
        pushed: what the publisher returned (a :class:`~gainsurgery.hub.publish.PushResult`), if any.
    """

    plan: GGUFPlan
    measured: Measured
    base: str
    out: Path | None = None
    dry_run: bool = False
    seconds: float = 0.0
    bytes_written: int = 0
    base_bytes: int = 0
    base_sha256: str = ""
    record: dict[str, Any] = field(default_factory=dict)
    verified: bool = False
    warnings: list[str] = field(default_factory=list)
    pushed: Any = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready: routes per gain key, a report per rewritten tensor, sizes."""
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
        g = self.plan.base
        delta = sum(self.measured.out_nbytes(t) - t.nbytes for t in g.tensors)
        return g.size + delta


def _default_warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


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


def _plan_and_measure(opened: OpenedGGUF, gains: Sequence[str | os.PathLike[str] | GainFile],
                      options: GGUFOptions, hub: HubClient | None, progress: ProgressFactory | None
                      ) -> tuple[LoadedGains, GGUFPlan, Measured]:
    loaded = load_gains(gains, allow_negative=options.allow_negative, hub=hub)
    plan = make_plan(opened.file, loaded.gain, loaded.sources, options)
    bar = progress("measure", plan.bytes_rewritten) if progress is not None else None
    try:
        measured = measure(plan, digest_keys={k for c in loaded.checks for k in c.keys},
                           progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    return loaded, plan, measured


def apply_gguf(
    base: str | os.PathLike[str],
    gains: Sequence[str | os.PathLike[str] | GainFile],
    out: str | os.PathLike[str] | None,
    *,
    options: GGUFOptions | None = None,
    overwrite: bool = False,
    verify: bool = False,
    dry_run: bool = False,
    allow_base_mismatch: bool = False,
    progress: ProgressFactory | None = None,
    hub: HubClient | None = None,
    warn: Warn | None = None,
    publish: Any = None,
    base_model: str | None = None,
) -> GGUFApplyResult:
    """Apply (and stack) gain files onto a GGUF file, streaming into the GGUF file ``out``.

    See the module docstring for the steps and docs/gguf.md for the routes. ``out`` is
    never the base, a gain file, a link or a folder; it appears only when complete (and
    with ``verify``, verified); an existing one is replaced only with ``overwrite``.

    Args:
        base: a ``.gguf`` file.
        gains: gain files (paths, ``ORG/REPO[@REV]:path``, or :class:`GainFile` objects).
        out: the output ``.gguf`` file.
        options: tolerance of re-quantization, ``keep_types``, negative gains, saturation.
        overwrite: replace an existing ``out`` (atomically, on success).
        verify: recompute every rewritten tensor and compare every byte before ``out`` appears.
        dry_run: plan and measure (routes, types, errors); write nothing.
        allow_base_mismatch: apply a gain trained on other weights (warned, recorded).
        progress: a progress-bar factory, ``progress(description, total_bytes)``.
        hub: the Hub client for Hub gain files.
        warn: receives one-line warnings.
        publish: the push step (a :class:`~gainsurgery.hub.publish.HubPublisher`): the
            verified file and its model card go up in one commit before ``out`` appears;
            a failed push discards it.
        base_model: the Hub repo id the model card names as ``base_model`` (default: a Hub base's).

    Returns:
        A :class:`GGUFApplyResult`.

    Raises:
        GainSurgeryError: anything the user can fix; ``out`` is then left as it was.

    Example:
        >>> r = apply_gguf("gemma-3-270m-Q4_K_M.gguf", ["legal.safetensors"], "legal.gguf")  # doctest: +SKIP
        >>> [t["route"] for t in r.summary()["routes"]][:2]  # doctest: +SKIP
        ['requantize', 'moved']
    """
    options = options or GGUFOptions()
    said: list[str] = []
    if out is None:
        raise PlanError("give OUT, the .gguf file to write")
    if not is_gguf(out):
        raise PlanError(f"OUT {show_path(out)} must be a .gguf file when BASE is one (the result is a GGUF file)")
    with opened_gguf(base, hub) as opened:
        loaded, plan, measured = _plan_and_measure(opened, gains, options, hub, progress)
        inputs = [opened.path, *loaded.paths]
        result = GGUFApplyResult(plan, measured, opened.label, base_bytes=opened.file.size)
        if dry_run:
            target = check_output(out, inputs=inputs, kind="file", overwrite=overwrite)
            if os.path.lexists(target) and not overwrite:
                raise OutputError(f"OUT already exists: {show_path(out)} (pass --overwrite to replace it)")
            check_fingerprints(loaded, measured, allow_base_mismatch=allow_base_mismatch, warn=said.append,
                               written="a run would write nothing")
            result.dry_run = True
            result.warnings = said
            return result
        mismatched, matched = check_fingerprints(loaded, measured, allow_base_mismatch=allow_base_mismatch,
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
        with _writing(out), claim_file(out, inputs=inputs, overwrite=overwrite) as claim:
            if publish is not None:
                publish.prepare()  # a bad token fails before any work
            bar = progress("apply", opened.file.size) if progress is not None else None
            try:
                written = write_gguf(measured, claim.file, metadata(record), sha_placeholder=sha,
                                     progress=bar.update if bar is not None else None)
            finally:
                if bar is not None:
                    bar.close()
            record["base"]["sha256"] = written.base_sha256
            checked = verify or publish is not None
            if checked:
                with open_gguf(claim.tmp, error=OutputError) as o:
                    report = verify_file(measured, o, loaded.sources)
                if not report.ok:
                    raise GainSurgeryError("verification failed, output discarded: " + report.problems[0])
            pushed = None
            if publish is not None:
                items = gguf_upload_items(claim.tmp, Path(out).name, record, written.header_bytes,
                                          base_model=base_model or opened.hub_id)
                pushed = publish.publish_items(items)
            published = claim.publish()
    for message in said:
        (warn or _default_warn)(message)
    result.out, result.seconds, result.bytes_written = published, time.perf_counter() - t0, written.bytes
    result.base_sha256, result.record, result.verified, result.warnings = written.base_sha256, record, checked, said
    result.pushed = pushed
    return result


def gguf_upload_items(path: Path, name: str, record: dict[str, Any], header_bytes: int, *,
                      base_model: str | None = None) -> list[Any]:
    """What pushing an adapted GGUF uploads: the file under ``name`` and a model card made from its record.

    Only the file's header (``header_bytes``: every key/value, where text can be) is
    scanned for the token before the upload; its tensor data is numbers.

    Raises:
        GainSurgeryError: ``name`` is not a plain ``.gguf`` file name.
    """
    from gainsurgery.hub.cards import CARD_NAME, gguf_model_card
    from gainsurgery.hub.publish import UploadItem, text_item

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
    from gainsurgery.errors import CheckpointError

    with open_gguf(path) as g:
        record = read_record(g)
        if record is None:
            raise CheckpointError(f"{show_path(path)} carries no gainsurgery.record (not adapted by gainsurgery); "
                                  "upload a plain GGUF with `hf upload`")
        return gguf_upload_items(Path(path), g.name, record, g.data_offset, base_model=base_model)


def _record(opened: OpenedGGUF, loaded: LoadedGains, plan: GGUFPlan, measured: Measured, sha: str,
            mismatched: list[str], matched: dict[str, str]) -> dict[str, Any]:
    """The provenance record (the base's sha256 still the placeholder ``sha``)."""
    from gainsurgery.errors import CheckpointError

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


def verify_gguf(base: str | os.PathLike[str], gains: Sequence[str | os.PathLike[str] | GainFile],
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
        loaded, plan, measured = _plan_and_measure(opened, gains, options, hub, None)
        bar = progress("verify", opened.file.size) if progress is not None else None
        try:
            return verify_file(measured, o, loaded.sources, progress=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()


def _recorded_options(o: GGUFFile, allow_negative: bool) -> GGUFOptions:
    """The options an adapted file says it was made with (defaults when it says nothing usable)."""
    from gainsurgery.errors import CheckpointError

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



@dataclass
class GGUFTargets:
    """The GAIN targets of a GGUF base (see :func:`gguf_targets`).

    Attributes:
        model_type: the transformers model type the file's architecture is.
        targets: the targets, keyed by checkpoint names (what a gain file holds).
        where: gain key -> the GGUF tensor, its type, and the route a gain there takes.
        structure: a short identity of the file's tensors (names, types, shapes).
        content: ``base_tensors_sha256`` of the targets (the F32 dequantization), when asked for.
        path: the local file read.
    """

    model_type: str
    targets: list[Any]
    where: dict[str, dict[str, Any]]
    structure: str
    content: str | None
    path: Path


def gguf_targets(base: str | os.PathLike[str], method: str = "gain-ffn", side: str = "in", *,
                 hub: HubClient | None = None, fingerprint: bool = False) -> GGUFTargets:
    """Which tensors a GAIN method scales on a GGUF base, under their checkpoint names, and each one's route.

    The route is the one a gain with distinct values per feature would take (moved
    exactly onto another tensor's rows, folded, or re-quantized).

    Raises:
        ArchitectureError: an architecture the registry does not support as GGUF, or
            a block without the expected tensors.
    """
    import hashlib
    import json

    import numpy as np

    from gainsurgery.architectures import Target
    from gainsurgery.architectures.registry import METHODS, SIDES
    from gainsurgery.errors import ArchitectureError
    from gainsurgery.formats.gguf.engine import digest_tensor
    from gainsurgery.formats.gguf.names import NameMap
    from gainsurgery.io.fingerprint import combine

    if method not in METHODS:
        raise ArchitectureError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if side not in SIDES:
        raise ArchitectureError(f"unknown side {side!r}; choose 'in' or 'out'")
    with opened_gguf(base, hub) as opened:
        g = opened.file
        names = NameMap(g)
        kinds = {"attn_out": "ATTN_OUT", **({"ffn_down": "FFN_DOWN"} if method == "gain-ffn" else {})}
        targets, vectors, dims = [], {}, {}
        for block in range(names.blocks):
            for kind, tensor_kind in kinds.items():
                name = names.gguf_name(tensor_kind, block)
                entry = g.by_name.get(name)
                if entry is None or len(entry.ne) != 2:
                    raise ArchitectureError(f"{g.name}: block {block} has no 2-D {name}")
                key = names.checkpoint_name(entry, kind)
                dim = 1 if side == "in" else 0
                targets.append(Target(key, dim, entry.shape[dim], kind, block, "linear"))
                # Distinct values per feature: the general case a trained gain is.
                vectors[key] = np.linspace(0.9, 1.1, entry.shape[dim], dtype=np.float32)
                dims[key] = dim
        plan = make_plan(g, GainFile(vectors, dims, {}))
        where = {line["key"]: {k: v for k, v in line.items() if k != "key"} for line in plan.routes()}
        spec = {t.name: [t.type_name, list(t.shape)] for t in g.tensors}
        structure = "sha256:" + hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":"))
                                               .encode()).hexdigest()[:16]
        content = None
        if fingerprint:
            digests = {t.key: digest_tensor(g, g.by_name[plan.keys[t.key]]).digests()["F32"] for t in targets}
            content = combine(digests)
        return GGUFTargets(names.arch.model_type, targets, where, structure, content, opened.path)


def inspect_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a GGUF file holds: architecture, tensor types and sizes, metadata, and its gainsurgery record.

    Long values are summarized (arrays by their length and item type, strings cut at
    200 characters); nothing is decoded beyond that.

    Example:
        >>> inspect_gguf("legal.gguf")["types"]["Q4_K"]  # doctest: +SKIP
        {'tensors': 18, 'bytes': 6635520}
    """
    from gainsurgery.formats.gguf.provenance import is_ours

    with opened_gguf(path) as opened:
        g = opened.file
        types: dict[str, dict[str, int]] = {}
        for t in g.tensors:
            entry = types.setdefault(t.type_name, {"tensors": 0, "bytes": 0, "weights": 0})
            entry["tensors"] += 1
            entry["bytes"] += t.nbytes
            entry["weights"] += t.n_elements
        meta: dict[str, Any] = {}
        for key in g.keys:
            if is_ours(key):
                continue
            meta[key] = _summary(g, key)
        return {"file": g.name, "bytes": g.size, "version": g.version, "architecture": g.arch,
                "tensors": len(g.tensors), "weights": sum(t.n_elements for t in g.tensors),
                "types": dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"])), "metadata": meta,
                "gainsurgery": read_record(g)}


def _summary(g: GGUFFile, key: str) -> Any:
    f = g.field(key)
    kinds = [int(t) for t in f.types]
    if kinds[0] == 8:
        text = g.string(key) or ""
        return text if len(text) <= 200 else text[:200] + f"... ({len(text)} characters)"
    if kinds[0] == 9:
        from gainsurgery.formats.gguf.library import gguf_module

        item = gguf_module().GGUFValueType(int(f.parts[3][0])).name
        return f"[{len(f.data)} {item} items]"
    return f.parts[-1].tolist()[0]
