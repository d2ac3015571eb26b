"""Checkpoints: apply gains (by streaming, in constant memory), verify a merged copy, list a base's targets."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from gainsurgery import gainfile as gf
from gainsurgery.applying.options import ApplyOptions
from gainsurgery.applying.pipeline import apply as run_apply
from gainsurgery.applying.result import ApplyResult
from gainsurgery.applying.steps import ProgressFactory
from gainsurgery.applying.pipeline import verify_output as verify  # noqa: F401 (gainsurgery.api.verify)
from gainsurgery.architectures import Target, model_type_of, num_layers, resolve_targets
from gainsurgery.gainfile import GainFile
from gainsurgery.io.checkpoint import fingerprint as structure
from gainsurgery.io.fingerprint import base_tensors_sha256
from gainsurgery.sources.base import opened_base
from gainsurgery.sources.spec import classify_base

if TYPE_CHECKING:
    from gainsurgery.hub.client import HubClient


def apply(
    base: str | os.PathLike[str],
    gains: Sequence[GainFile | str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
    verify: bool = False,
    dry_run: bool = False,
    allow_negative: bool = False,
    allow_saturation: bool = False,
    allow_base_mismatch: bool = False,
    base_model: str | None = None,
    chunk_bytes: int | None = None,
    threads: int | None = None,
    progress: ProgressFactory | None = None,
    push_to: str | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    hub: HubClient | None = None,
    warn: Callable[[str], None] | None = None,
    keep_types: bool = False,
    requant_tolerance: float | None = None,
    options: ApplyOptions | None = None,
) -> ApplyResult:
    """Stream gains into a merged copy of ``base``, in constant memory; OUT appears only when complete.

    A ``base`` ending in ``.gguf`` is a GGUF file: the result is the GGUF file ``out``
    (see :mod:`gainsurgery.applying.gguf_sink` and docs/gguf.md).

    The same orchestration as ``gainsurgery apply`` (:func:`gainsurgery.applying.pipeline.apply`);
    the options become one :class:`~gainsurgery.applying.options.ApplyOptions`, checked
    before anything is read. With ``push_to`` and no ``out``, the result goes straight
    to the Hub, shard by shard, never more than three shards on disk (see
    :mod:`gainsurgery.applying.hub_sink`).

    Args:
        base: a checkpoint folder, ``embedded:NAME`` or a Hub repo ``ORG/NAME[@REV]``.
        gains: gain files (paths, ``ORG/REPO[@REV]:path`` on the Hub) or :class:`GainFile`
            objects; several are multiplied in float32 and applied in one pass.
        out: the output folder; must not exist unless ``overwrite``. None: needs
            ``push_to`` (Hub to Hub, no local copy).
        overwrite: replace an existing OUT, atomically, on success.
        verify: check every byte before OUT appears (always done when pushing).
        dry_run: plan only; write nothing (without OUT: also the bytes to move and the peak disk).
        allow_negative: accept negative gains.
        allow_saturation: write weights that scaling turns into ±inf or 0 (recorded)
            instead of failing with the tensor's name and counts.
        allow_base_mismatch: apply a gain whose ``base_tensors_sha256`` differs from
            ``base``'s target tensors (warned, recorded) instead of failing.
        base_model: the Hub repo id the model card names as ``base_model`` (default:
            a Hub base; never a local folder).
        chunk_bytes: bytes of tensor data scaled per read; bounds peak memory (default: 64 MiB;
            16 MiB without OUT).
        threads: compute threads (default: CPUs, at most 4).
        progress: a progress-bar factory, ``progress(description, total_bytes)``.
        push_to: also publish the result to this Hub repo (verified first; a failed
            push leaves no OUT and no commit).
        private: with ``push_to``, create the repo private.
        revision: with ``push_to``, the branch to commit to (created if missing).
        create_pr: with ``push_to``, open a pull request instead of committing.
        commit_message: with ``push_to``, the commit title.
        work_dir: without OUT, where the work folder goes (default: ``$TMPDIR``).
        hub: the Hub client (default: from ``HF_ENDPOINT``/``HF_TOKEN``/login, read now).
        warn: receives one-line warnings (default: :func:`warnings.warn`).
        keep_types: GGUF base only: re-quantize every tensor to its own type, never promote.
        requant_tolerance: GGUF base only: the largest error re-quantizing a tensor may add,
            as a fraction of the gain's own change to it (default 0.1); beyond it the
            tensor is promoted to a wider type.
        options: all of the options above at once, as an
            :class:`~gainsurgery.applying.options.ApplyOptions` (what the command line
            passes); then none of them may be given on its own.

    Returns:
        An :class:`~gainsurgery.applying.result.ApplyResult` (``out``, ``plan``, ``shard_sha256``,
        ``seconds``, ``verified``, ``pushed``...); for a GGUF base, its
        :class:`~gainsurgery.applying.result.GGUFApplyResult` kind (routes, measured errors).

    Raises:
        GainSurgeryError: bad base or gain, unusable OUT, failed verification, Hub
            failure; nothing is left behind.

    Example:
        >>> result = apply("base/", ["legal.safetensors"], "merged/", verify=True)  # doctest: +SKIP
        >>> result.plan.tensors_touched, result.verified  # doctest: +SKIP
        (36, True)
        >>> apply("org/base", ["legal.safetensors"], push_to="me/base-legal").pushed.commit_url  # doctest: +SKIP
    """
    given = ApplyOptions(overwrite=overwrite, verify=verify, dry_run=dry_run, allow_negative=allow_negative,
                         allow_saturation=allow_saturation, allow_base_mismatch=allow_base_mismatch,
                         base_model=base_model, chunk_bytes=chunk_bytes, threads=threads, work_dir=work_dir,
                         push_to=push_to, private=private, revision=revision, create_pr=create_pr,
                         commit_message=commit_message, keep_types=keep_types, requant_tolerance=requant_tolerance)
    if options is None:
        options = given
    elif given != ApplyOptions():
        raise TypeError("apply(): give options=ApplyOptions(...) or the options one by one, not both")
    return run_apply(base, gains, out, options, progress=progress, hub=hub, warn=warn)


@dataclass
class TargetList:
    """The tensors GAIN adapts on a base (see :func:`targets`).

    Attributes:
        base: the base as given.
        model_type: its transformers ``model_type``.
        method: ``gain`` or ``gain-ffn``.
        side: ``in`` or ``out``.
        targets: the tensors, in layer order.
        fingerprint: the base's structure fingerprint (names, dtypes, shapes).
        base_model: what a gain file records as ``base_model`` (a Hub id or
            ``embedded:NAME``; None for a local folder, see :func:`gainsurgery.sources.local.base_model_name`).
        base_tensors_sha256: the content fingerprint of the target tensors, when asked
            for (``targets(..., fingerprint=True)`` on a local or embedded base).
        inputs: the local folders the base was read from (an output must keep away from them).
        gguf: for a GGUF base, gain key -> its GGUF tensor, type and route.
    """

    base: str
    model_type: str
    method: str
    side: str
    targets: list[Target]
    fingerprint: str
    base_model: str | None = None
    base_tensors_sha256: str | None = None
    inputs: list[Path] = field(default_factory=list)
    gguf: dict[str, dict[str, Any]] | None = None

    @property
    def parameters(self) -> int:
        """Number of gains the method learns on this base."""
        return sum(t.length for t in self.targets)

    def identity(self) -> GainFile:
        """A gain file of ones for these targets (applying it changes no byte)."""
        meta = {"method": self.method, "side": self.side, "base_model": self.base_model,
                "base_fingerprint": self.fingerprint, gf.BASE_TENSORS_KEY: self.base_tensors_sha256,
                "description": "identity gain (all ones)"}
        return gf.identity({t.key: (t.dim, t.length) for t in self.targets},
                           {k: v for k, v in meta.items() if v is not None})


def targets(base: str | os.PathLike[str], method: str = "gain-ffn", side: str = "in", *,
            hub: HubClient | None = None, fingerprint: bool = False) -> TargetList:
    """Which tensors a GAIN method scales on ``base``, from its headers and config.json only.

    Args:
        base: a checkpoint folder, ``embedded:NAME`` or a Hub repo (headers are range-read).
        method: ``gain`` (attention output projection) or ``gain-ffn`` (+ FFN down projection).
        side: ``in`` (W·diag(s), the paper's default) or ``out`` (diag(s)·W, bias too).
        hub: the Hub client for a Hub base.
        fingerprint: also hash the target tensors' bytes (``base_tensors_sha256``, for
            :meth:`TargetList.identity`); reads those tensors once. Not done for a Hub
            base, whose weights this command never downloads.

    Returns:
        A :class:`TargetList`; ``.identity()`` makes a gain file of ones for them.

    Raises:
        ArchitectureError: unknown model type, or tensors that do not match the registry.

    Example:
        >>> t = targets("embedded:gemma-3-270m", "gain-ffn")  # doctest: +SKIP
        >>> t.parameters  # doctest: +SKIP
        55296
    """
    spec = classify_base(base)
    if spec.is_gguf:
        from gainsurgery.sources.gguf import gguf_targets  # the gguf library: only for a GGUF base

        info = gguf_targets(spec, method, side, hub=hub, fingerprint=fingerprint)
        return TargetList(str(base), info.model_type, method, side, info.targets, info.structure, None, info.content,
                          [info.path], info.where)

    with opened_base(spec, hub) as opened:  # headers only, also for a Hub base
        ckpt = opened.checkpoint
        model_type = model_type_of(ckpt.config)
        found = resolve_targets({n: t.shape for n, t in ckpt.tensors.items()}, model_type, method, side,
                                expected_layers=num_layers(ckpt.config))
        content = base_tensors_sha256(ckpt, [t.key for t in found]) if fingerprint and opened.remote is None else None
        recorded = opened.hub_id or (str(base) if opened.facts else None)
        return TargetList(str(base), model_type, method, side, found, structure(ckpt), recorded, content,
                          opened.local_inputs())


def inspect_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a GGUF file holds: architecture, tensor types and sizes, metadata, its gainsurgery record.

    See :func:`gainsurgery.sources.gguf.inspect_gguf`.

    Example:
        >>> inspect_gguf("legal.gguf")["gainsurgery"]["gains"][0]["name"]  # doctest: +SKIP
        'legal.safetensors'
    """
    # The GGUF engine imports the gguf library (a third of a second): only for a GGUF file.
    from gainsurgery.sources.gguf import inspect_gguf as inspect

    return inspect(path)
