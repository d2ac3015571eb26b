"""The public Python API: gainsurgery for notebooks and pipelines.

Everything the command line does is a call here (the CLI only parses and prints),
re-exported lazily from the package: ``from gainsurgery import apply, load_gain``.

Gain files::

    g = load_gain("legal.safetensors")
    both = stack_gains(["legal.safetensors", "medical.safetensors"])
    save_gain(invert_gain(g), "undo-legal.safetensors")

Merging, by streaming, in constant memory::

    result = apply("base/", ["legal.safetensors"], "merged/", verify=True)

Gains on a model in memory, as forward hooks::

    with attach(model, "legal.safetensors"):
        logits = model(input_ids).logits

Training::

    train(TrainConfig(base="embedded:gemma-3-270m", data=["legal.txt"], output="legal.safetensors"))

Functions that need torch (:func:`attach`, :func:`train`, :func:`evaluate`,
:func:`export_peft`, :func:`import_peft`) need the ``train`` extra.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from gainsurgery import gainfile as gf
from gainsurgery.gainfile import GainFile
from gainsurgery.io.hashing import sha256_file

if TYPE_CHECKING:
    from gainsurgery.architectures import Target
    from gainsurgery.hub.client import HubClient
    from gainsurgery.hub.publish import PushResult, UploadItem
    from gainsurgery.interop.peft import ExportResult
    from gainsurgery.formats.gguf import GGUFVerifyReport
    from gainsurgery.merge import ApplyResult, ProgressFactory, VerifyReport
    from gainsurgery.merge.gguf_sink import GGUFApplyResult
    from gainsurgery.training import TrainConfig, TrainResult
    from gainsurgery.training.hooks import GainHooks

__all__ = ["apply", "attach", "evaluate", "export_peft", "import_peft", "inspect_gain", "inspect_gguf", "invert_gain",
           "load_gain", "power_gain", "push", "save_gain", "stack_gains", "targets", "train", "verify"]


# --------------------------------------------------------------------------- gain files


def load_gain(path: str | os.PathLike[str], *, allow_negative: bool = False) -> GainFile:
    """Load and validate a gain file (format v1).

    Args:
        path: the ``.safetensors`` gain file.
        allow_negative: accept negative gains (sign flips); refused by default.

    Returns:
        The :class:`~gainsurgery.gainfile.GainFile`: ``vectors``, ``dims``, ``metadata``.

    Raises:
        GainFileError: missing, not a gain file, or holding NaN, infinite, zero or negative gains.

    Example:
        >>> g = load_gain("legal.safetensors")  # doctest: +SKIP
        >>> g.num_parameters, g.metadata["method"]  # doctest: +SKIP
        (55296, 'gain-ffn')
    """
    return gf.load(path, allow_negative=allow_negative)


def save_gain(gain: GainFile, path: str | os.PathLike[str]) -> Path:
    """Write ``gain`` as a v1 gain file, atomically (temp file, fsync, rename).

    Returns:
        The path written.

    Raises:
        GainFileError: the gain breaks the format (e.g. non-float32 vectors), or the folder is missing.

    Example:
        >>> save_gain(g, "copy.safetensors")  # doctest: +SKIP
        PosixPath('copy.safetensors')
    """
    return gain.save(path)


def _load_each(gains: Sequence[GainFile | str | os.PathLike[str]], allow_negative: bool
               ) -> list[tuple[GainFile, str, str | None]]:
    """(gain, name, path or None) for each gain object or path."""
    out = []
    for i, g in enumerate(gains):
        if isinstance(g, GainFile):
            out.append((g, f"gain[{i}]", None))
        else:
            out.append((gf.load(g, allow_negative=allow_negative), Path(g).name, str(g)))
    return out


def stack_gains(gains: Sequence[GainFile | str | os.PathLike[str]], *, allow_negative: bool = False,
                description: str | None = None, allow_base_mismatch: bool = False) -> GainFile:
    """Compose gains into one: the float32 product on shared tensors, the union otherwise.

    Applying the result once equals applying the product of the vectors, rounded
    once per tensor (not once per file).

    Args:
        gains: gain files (paths) or :class:`GainFile` objects, in order.
        allow_negative: accept negative gains in the inputs.
        description: free text stored in the metadata.
        allow_base_mismatch: stack gains whose base fingerprints say they were trained
            on different bases (refused by default).

    Returns:
        The stacked gain; ``metadata["parents"]`` names each input (with its sha256 for
        files) and keeps each parent's base fingerprint.

    Raises:
        GainFileError: a tensor is scaled along different dims, an input is invalid, or
            the inputs were trained on different bases.

    Example:
        >>> both = stack_gains(["legal.safetensors", "medical.safetensors"])  # doctest: +SKIP
        >>> save_gain(both, "both.safetensors")  # doctest: +SKIP
    """
    loaded = _load_each(gains, allow_negative)
    stacked = gf.stack([g for g, _, _ in loaded], [name for _, name, _ in loaded],
                       allow_base_mismatch=allow_base_mismatch)
    for parent, (_, _, path) in zip(stacked.metadata["parents"], loaded):
        if path is not None:
            parent["sha256"] = sha256_file(path)
    if description:
        stacked.metadata["description"] = description
    return stacked


def invert_gain(gain: GainFile | str | os.PathLike[str]) -> GainFile:
    """The inverse gain (1/s in float32), which undoes ``gain`` up to rounding.

    Args:
        gain: a gain file (path) or a :class:`GainFile`.

    Returns:
        The inverse; for a file, ``metadata["parents"]`` records its name and sha256.

    Raises:
        GainFileError: the inverse overflows float32 (gains too close to zero).

    Example:
        >>> save_gain(invert_gain("legal.safetensors"), "undo-legal.safetensors")  # doctest: +SKIP
    """
    (g, name, path), = _load_each([gain], allow_negative=True)
    inv = gf.invert(g)
    if path is not None:
        inv.metadata["parents"] = [{"name": name, "sha256": sha256_file(path), "op": "invert"}]
    return inv


def inspect_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a GGUF file holds: architecture, tensor types and sizes, metadata, its gainsurgery record.

    See :func:`gainsurgery.merge.gguf_sink.inspect_gguf`.

    Example:
        >>> inspect_gguf("legal.gguf")["gainsurgery"]["gains"][0]["name"]  # doctest: +SKIP
        'legal.safetensors'
    """
    from gainsurgery.merge.gguf_sink import inspect_gguf as inspect

    return inspect(path)


def power_gain(gain: GainFile | str | os.PathLike[str], alpha: float) -> GainFile:
    """The gain s^α: the same adaptation, weaker (0 < α < 1) or stronger (α > 1), without retraining.

    Args:
        gain: a gain file (path) or a :class:`GainFile`.
        alpha: the power; 0 gives the identity, 1 the gain itself, −1 its inverse.

    Returns:
        s^α in float32; for a file, ``metadata["parents"]`` records its name, sha256 and the power.

    Raises:
        GainFileError: α not finite, a non-integer α on negative gains, or a float32 overflow.

    Example:
        >>> save_gain(power_gain("legal.safetensors", 0.5), "legal-half.safetensors")  # doctest: +SKIP
    """
    (g, name, path), = _load_each([gain], allow_negative=True)
    out = gf.power(g, alpha)
    if path is not None:
        out.metadata["parents"] = [{"name": name, "sha256": sha256_file(path), "op": "power", "power": float(alpha)}]
    return out


def inspect_gain(gain: GainFile | str | os.PathLike[str], *, plot: str | os.PathLike[str] | None = None
                 ) -> dict[str, Any]:
    """Statistics of a gain: parameter count, min/max/mean/std and the share above 1, overall,
    per target tensor and per layer, plus its metadata.

    Args:
        gain: a gain file (path) or a :class:`GainFile`.
        plot: also draw per-layer distributions into this PNG (needs the ``plots`` extra);
            written whole or not at all, never over the gain file.

    Returns:
        ``{"parameters", "tensors", "overall", "per_layer", "per_target", "metadata", "base_coverage"}``
        (``base_coverage``: how many of its tensors no base fingerprint covers).

    Example:
        >>> inspect_gain("legal.safetensors")["overall"]["mean"]  # doctest: +SKIP
        1.0031
    """
    (g, name, path), = _load_each([gain], allow_negative=True)
    if plot is not None:
        from gainsurgery.extras import require_extra
        from gainsurgery.io.atomic import atomic_file

        require_extra("plots", "inspect_gain(plot=...)")
        from gainsurgery.plots import plot_gain_distributions

        with atomic_file(plot, inputs=[path], what="plot file") as f:
            plot_gain_distributions(g, f, title=name)
    return gf.stats(g)


# --------------------------------------------------------------------------- checkpoints


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
) -> ApplyResult | GGUFApplyResult:
    """Stream gains into a merged copy of ``base``, in constant memory; OUT appears only when complete.

    A ``base`` ending in ``.gguf`` is a GGUF file: the result is the GGUF file ``out``
    (see :func:`gainsurgery.merge.gguf_sink.apply_gguf` and docs/gguf.md).

    The same orchestration as ``gainsurgery apply`` (see :func:`gainsurgery.merge.apply`).
    With ``push_to`` and no ``out``, the result goes straight to the Hub, shard by
    shard, never more than three shards on disk (see :mod:`gainsurgery.merge.hub_pipeline`).

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

    Returns:
        An :class:`~gainsurgery.merge.ApplyResult` (``out``, ``plan``, ``shard_sha256``,
        ``seconds``, ``verified``, ``pushed``...), or for a GGUF base a
        :class:`~gainsurgery.merge.gguf_sink.GGUFApplyResult`.

    Raises:
        GainSurgeryError: bad base or gain, unusable OUT, failed verification, Hub
            failure; nothing is left behind.

    Example:
        >>> result = apply("base/", ["legal.safetensors"], "merged/", verify=True)  # doctest: +SKIP
        >>> result.plan.tensors_touched, result.verified  # doctest: +SKIP
        (36, True)
        >>> apply("org/base", ["legal.safetensors"], push_to="me/base-legal").pushed.commit_url  # doctest: +SKIP
    """
    from gainsurgery import merge
    from gainsurgery.formats.gguf import is_gguf

    if is_gguf(str(base)):
        return _apply_gguf(base, gains, out, overwrite=overwrite, verify=verify, dry_run=dry_run,
                           allow_negative=allow_negative, allow_saturation=allow_saturation,
                           allow_base_mismatch=allow_base_mismatch, progress=progress, push_to=push_to, hub=hub,
                           warn=warn, keep_types=keep_types, requant_tolerance=requant_tolerance,
                           private=private, revision=revision, create_pr=create_pr, commit_message=commit_message,
                           base_model=base_model, work_dir=work_dir)
    if keep_types or requant_tolerance is not None:
        from gainsurgery.errors import GainSurgeryError

        raise GainSurgeryError("--keep-types and --requant-tolerance are for a GGUF BASE (a .gguf file)")
    if out is not None and is_gguf(str(out)):
        from gainsurgery.errors import GainSurgeryError

        raise GainSurgeryError(f"OUT ends in .gguf, but BASE is a safetensors checkpoint, whose result is a folder; "
                               "to adapt a GGUF file, give the .gguf file as BASE")
    publisher = None
    if push_to:
        from gainsurgery.hub.client import HubClient
        from gainsurgery.hub.publish import HubPublisher
        from gainsurgery.hub.refs import check_repo_id

        check_repo_id(push_to)
        _refuse_pushing_over_the_base(str(base), push_to, revision, create_pr)
        hub = hub if hub is not None else HubClient.from_env()
        # The commit title names folders by their name only (a local path says who and where the user is).
        from gainsurgery.sources import base_model_name

        name = Path(out).name if out is not None else (base_model_name(str(base)) or Path(str(base)).name)
        publisher = HubPublisher(hub, push_to, private=private, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or f"Upload {name} (gainsurgery apply)")
    elif revision or create_pr or commit_message:
        from gainsurgery.errors import GainSurgeryError

        raise GainSurgeryError("--revision, --create-pr and --commit-message go with --push")
    if out is None and overwrite:
        from gainsurgery.errors import GainSurgeryError

        raise GainSurgeryError("--overwrite goes with OUT; without OUT nothing local is written")
    if out is not None and work_dir is not None:
        from gainsurgery.errors import GainSurgeryError

        raise GainSurgeryError("--work-dir goes with --push and no OUT (the shards in flight); with OUT, the "
                               "output is written beside OUT")
    return merge.apply(base, gains, out, overwrite=overwrite, verify=verify, dry_run=dry_run,
                       allow_negative=allow_negative, allow_saturation=allow_saturation,
                       allow_base_mismatch=allow_base_mismatch, base_model=base_model, chunk_bytes=chunk_bytes,
                       threads=threads, progress=progress, publish=publisher, hub=hub, warn=warn,
                       work_dir=work_dir)


def _apply_gguf(base: str | os.PathLike[str], gains: Sequence[GainFile | str | os.PathLike[str]],
                out: str | os.PathLike[str] | None, *, overwrite: bool, verify: bool, dry_run: bool,
                allow_negative: bool, allow_saturation: bool, allow_base_mismatch: bool,
                progress: ProgressFactory | None, push_to: str | None, hub: HubClient | None,
                warn: Callable[[str], None] | None, keep_types: bool,
                requant_tolerance: float | None, private: bool, revision: str | None, create_pr: bool,
                commit_message: str | None, base_model: str | None,
                work_dir: str | os.PathLike[str] | None) -> GGUFApplyResult:
    """:func:`apply` with a GGUF BASE (see :func:`gainsurgery.merge.gguf_sink.apply_gguf`)."""
    from gainsurgery.errors import GainSurgeryError
    from gainsurgery.formats.gguf import DEFAULT_TOLERANCE, GGUFOptions
    from gainsurgery.merge.gguf_sink import apply_gguf

    if work_dir is not None:
        raise GainSurgeryError("--work-dir is for a safetensors BASE pushed without OUT; a GGUF result is "
                               "written to OUT (and pushed from there)")
    if base_model is not None:
        from gainsurgery.hub.refs import check_repo_id

        check_repo_id(base_model, what="--base-model")
    publisher = None
    if push_to:
        from gainsurgery.hub.client import HubClient
        from gainsurgery.hub.publish import HubPublisher
        from gainsurgery.hub.refs import check_repo_id, parse_file_ref

        check_repo_id(push_to)
        if out is None:
            raise GainSurgeryError("give OUT, the .gguf file to write; --push uploads it once it is verified")
        ref = parse_file_ref(str(base))
        if ref is not None and ref.repo_id.lower() == push_to.lower() and not create_pr \
                and (revision or "main") == (ref.revision or "main"):
            raise GainSurgeryError(f"--push {push_to} would commit the adapted model into its own base's repo and "
                                   "branch; push to another repo, another branch (--revision) or a pull request "
                                   "(--create-pr)")
        hub = hub if hub is not None else HubClient.from_env()
        publisher = HubPublisher(hub, push_to, private=private, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or f"Upload {Path(out).name} (gainsurgery apply)")
    elif revision or create_pr or commit_message:
        raise GainSurgeryError("--revision, --create-pr and --commit-message go with --push")
    options = GGUFOptions(tolerance=DEFAULT_TOLERANCE if requant_tolerance is None else requant_tolerance,
                          keep_types=keep_types, allow_negative=allow_negative, allow_saturation=allow_saturation)
    return apply_gguf(base, gains, out, options=options, overwrite=overwrite, verify=verify, dry_run=dry_run,
                      allow_base_mismatch=allow_base_mismatch, progress=progress, hub=hub, warn=warn,
                      publish=publisher, base_model=base_model)


def _refuse_pushing_over_the_base(base: str, push_to: str, revision: str | None, create_pr: bool) -> None:
    """A merged model never replaces its own base: same repo and branch is refused (a PR or another branch is fine)."""
    from gainsurgery.errors import GainSurgeryError
    from gainsurgery.io.inputs import classify_base_spec

    try:
        ref = classify_base_spec(base)
    except GainSurgeryError:
        return  # reported when the base is opened
    if ref.kind != "hub" or create_pr or str(ref.repo_id).lower() != push_to.lower():
        return
    if (revision or "main") == (ref.revision or "main"):
        raise GainSurgeryError(f"--push {push_to} would commit the merged model over its own base "
                               f"({base}); push to another repo, another branch (--revision) or a pull "
                               "request (--create-pr)")


def verify(
    base: str | os.PathLike[str],
    gains: Sequence[GainFile | str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    allow_negative: bool = False,
    allow_saturation: bool = False,
    chunk_bytes: int = 64 << 20,
    progress: ProgressFactory | None = None,
    hub: HubClient | None = None,
) -> VerifyReport | GGUFVerifyReport:
    """Check that ``out`` is exactly ``base`` with ``gains`` applied, bit for bit.

    A ``base`` ending in ``.gguf``: ``out`` is the adapted GGUF file (see
    :func:`gainsurgery.merge.gguf_sink.verify_gguf`).

    Args:
        base: the base (folder, ``embedded:NAME`` or Hub repo).
        gains: the gain files that were applied, in order.
        out: the merged folder to check.
        allow_negative: accept negative gains.
        allow_saturation: accept targets whose weights scaling turned into ±inf or 0
            (as ``apply(..., allow_saturation=True)`` wrote them); a problem otherwise.
        chunk_bytes: bytes compared per read.
        progress: a progress-bar factory.
        hub: the Hub client for a Hub base (default: from the environment).

    Returns:
        A :class:`~gainsurgery.merge.verify.VerifyReport`: ``ok``, ``problems``, counts.

    Example:
        >>> verify("base/", ["legal.safetensors"], "merged/").ok  # doctest: +SKIP
        True
    """
    from gainsurgery import merge
    from gainsurgery.formats.gguf import is_gguf

    if is_gguf(str(base)):
        from gainsurgery.merge.gguf_sink import verify_gguf

        return verify_gguf(base, gains, out, allow_negative=allow_negative, hub=hub, progress=progress)
    return merge.verify_merged(base, gains, out, allow_negative=allow_negative, allow_saturation=allow_saturation,
                               chunk_bytes=chunk_bytes, progress=progress, hub=hub)


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
            ``embedded:NAME``; None for a local folder, see :func:`gainsurgery.sources.base_model_name`).
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
    from gainsurgery.architectures import model_type_of, num_layers, resolve_targets
    from gainsurgery.formats.gguf import is_gguf
    from gainsurgery.io.checkpoint import fingerprint as structure
    from gainsurgery.io.fingerprint import base_tensors_sha256
    from gainsurgery.sources import opened_base

    if is_gguf(str(base)):
        from gainsurgery.merge.gguf_sink import gguf_targets

        info = gguf_targets(base, method, side, hub=hub, fingerprint=fingerprint)
        return TargetList(str(base), info.model_type, method, side, info.targets, info.structure, None, info.content,
                          [info.path], info.where)

    with opened_base(base, hub) as opened:  # headers only, also for a Hub base
        ckpt = opened.checkpoint
        model_type = model_type_of(ckpt.config)
        found = resolve_targets({n: t.shape for n, t in ckpt.tensors.items()}, model_type, method, side,
                                expected_layers=num_layers(ckpt.config))
        content = base_tensors_sha256(ckpt, [t.key for t in found]) if fingerprint and opened.remote is None else None
        recorded = opened.hub_id or (str(base) if opened.facts else None)
        return TargetList(str(base), model_type, method, side, found, structure(ckpt), recorded, content,
                          opened.local_inputs())


@dataclass
class PushPlan:
    """What :func:`push` uploads (or, with ``dry_run``, would upload).

    Attributes:
        kind: ``merged checkpoint`` or ``gain file``.
        repo_id: the target repo.
        items: the files of the commit.
        result: where they went (None for a dry run).
    """

    kind: str
    repo_id: str
    items: list[UploadItem]
    result: PushResult | None = None

    @property
    def bytes(self) -> int:
        """Total size of the upload."""
        return sum(i.size for i in self.items)


def push(source: str | os.PathLike[str], repo_id: str, *, private: bool = False, revision: str | None = None,
         create_pr: bool = False, commit_message: str | None = None, dry_run: bool = False,
         base_model: str | None = None, hub: HubClient | None = None) -> PushPlan:
    """Publish a merged folder or a gain file to the Hugging Face Hub, in one commit.

    A folder must be complete: index (or ``model.safetensors``), every shard with
    the sha256 its ``gainsurgery.json`` records, ``config.json``; a model card is
    added when it has none. A gain file goes up with a generated model card, and so
    does a GGUF file adapted by ``apply`` (its card made from its ``gainsurgery.record``).

    Args:
        source: a merged checkpoint folder, a gain file, or an adapted ``.gguf`` file.
        repo_id: ``org/name``.
        private: create the repo private (if it does not exist yet).
        revision: branch to commit to (created if missing).
        create_pr: open a pull request instead of committing to the branch.
        commit_message: the commit title.
        dry_run: check and list the files; contact nothing.
        base_model: the Hub repo id the model card names as ``base_model``; for a
            folder, its card is regenerated from its ``gainsurgery.json`` with it.
        hub: the Hub client (default: from ``HF_ENDPOINT``/``HF_TOKEN``/login, read now).

    Every file of a folder must be a regular file inside it (a link out, a FIFO or a
    device is refused, naming it), and no file may hold the current token's value.

    Returns:
        A :class:`PushPlan` with the files and, unless ``dry_run``, the push result.

    Raises:
        CheckpointError: the folder is incomplete, unsafe or differs from its provenance.
        HubError: a file holds the token; auth, not found, rate limit, network; nothing is committed.

    Example:
        >>> push("merged/", "me/qwen-legal", private=True).result.commit_url  # doctest: +SKIP
    """
    from gainsurgery.errors import GainSurgeryError
    from gainsurgery.hub import publish as pub
    from gainsurgery.hub.cards import CARD_NAME, merged_model_card
    from gainsurgery.hub.refs import check_repo_id
    from gainsurgery.io.checkpoint import open_checkpoint
    from gainsurgery.io.inputs import show_path
    from gainsurgery.merge.provenance import PROVENANCE_NAME, check_recorded_shards
    from gainsurgery.sources import base_facts

    check_repo_id(repo_id)
    if base_model is not None:
        check_repo_id(base_model, what="--base-model")
    path = Path(source)
    from gainsurgery.formats.gguf import is_gguf

    if is_gguf(source) and not path.is_dir():
        from gainsurgery.merge.gguf_sink import gguf_upload

        items = gguf_upload(path, base_model=base_model)
        kind = "GGUF file"
    elif path.is_dir():
        items = pub.folder_upload(path)  # a complete checkpoint: index, shards, config; every file safe
        provenance = check_recorded_shards(path, list(open_checkpoint(path).shards))
        has_card = any(i.path_in_repo == CARD_NAME for i in items)
        if base_model is not None and provenance is None:
            raise GainSurgeryError(f"--base-model rewrites the model card from {PROVENANCE_NAME}, which "
                                   f"{show_path(source)} does not have; edit its {CARD_NAME} instead")
        if provenance is not None and (not has_card or base_model is not None):
            items = [i for i in items if i.path_in_repo != CARD_NAME]
            items.append(pub.text_item(CARD_NAME, merged_model_card(provenance, provenance_file=PROVENANCE_NAME,
                                                                    base_model=base_model)))
        kind = "merged checkpoint"
    elif path.is_file():
        recorded = gf.load(path, allow_negative=True).metadata.get("base_model")
        items = pub.gain_upload(path, repo_id, base_facts(recorded if isinstance(recorded, str) else None),
                                base_model=base_model)
        kind = "gain file"
    else:
        raise GainSurgeryError(f"nothing to push: {show_path(source)} is neither a folder nor a gain file")
    plan = PushPlan(kind, repo_id, items)
    if not dry_run:
        from gainsurgery.hub.client import HubClient

        client = hub if hub is not None else HubClient.from_env()
        plan.result = pub.push(client, items, repo_id, private=private, revision=revision, create_pr=create_pr,
                               commit_message=commit_message or f"Upload {kind} with gainsurgery")
    return plan


# --------------------------------------------------------------------------- models in memory (torch)


def attach(model: Any, gains: GainFile | str | os.PathLike[str] | Sequence[GainFile | str | os.PathLike[str]]
           ) -> GainHooks:
    """Apply gains to an in-memory transformers model with forward hooks (no merge).

    Several gains are stacked first. The returned handle removes the hooks with
    ``.remove()``, and is a context manager that removes them on exit.

    Args:
        model: a transformers causal LM (its ``config.model_type`` must be supported).
        gains: a gain file (path) or :class:`GainFile`, or a list of them.

    Returns:
        A :class:`~gainsurgery.training.hooks.GainHooks` handle.

    Raises:
        MissingExtraError: torch is not installed (the ``train`` extra).
        ArchitectureError: a gain key matches no module of the model, or does not fit it.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("base/")  # doctest: +SKIP
        >>> with attach(model, "legal.safetensors"):  # doctest: +SKIP
        ...     adapted = model(input_ids).logits
        >>> plain = model(input_ids).logits  # hooks removed  # doctest: +SKIP
    """
    from gainsurgery.extras import require_extra

    require_extra("train", "attach()")
    from gainsurgery.training.hooks import attach as attach_hooks

    items = [gains] if isinstance(gains, (GainFile, str, os.PathLike)) else list(gains)
    loaded = [g for g, _, _ in _load_each(items, allow_negative=True)]
    gain = loaded[0] if len(loaded) == 1 else gf.stack(loaded)
    return attach_hooks(model, gain)


def train(config: TrainConfig) -> TrainResult:
    """Train GAIN gains (or a LoRA / IA3 baseline) on domain text and save them.

    The base stays frozen; one gain per adapted weight is learned (init 1) through
    forward hooks. GAIN methods write a v1 gain file, ``lora``/``ia3`` a PEFT
    adapter folder, to ``config.output``.

    Args:
        config: a :class:`~gainsurgery.training.config.TrainConfig`.

    Returns:
        A :class:`~gainsurgery.training.config.TrainResult` (loss, timings, evaluations).

    Raises:
        TrainingError: bad options, checked before the model is loaded; a diverging loss.
        MissingExtraError: the ``train`` extra is not installed.

    Example:
        >>> from gainsurgery import TrainConfig, train
        >>> result = train(TrainConfig(base="embedded:gemma-3-270m", data=["legal.txt"],
        ...                            output="legal.safetensors", steps=30))  # doctest: +SKIP
        >>> result.final_loss  # doctest: +SKIP
    """
    from gainsurgery.training.loop import train as run

    return run(config)


def evaluate(model: str, **kwargs: Any) -> dict[str, Any]:
    """Perplexity per domain and yes/no accuracy of a model, optionally with gains as hooks.

    See :func:`gainsurgery.training.evaluation.evaluate` for the arguments.

    Example:
        >>> evaluate("merged/", data={"legal": "legal/validation.txt"})["domains"]["legal"]["ppl"]  # doctest: +SKIP
    """
    from gainsurgery.training.evaluation import evaluate as run

    return run(model, **kwargs)


def export_peft(gain: str | os.PathLike[str], adapter_dir: str | os.PathLike[str], *, base: str,
                base_name: str | None = None, overwrite: bool = False, allow_negative: bool = False
                ) -> ExportResult:
    """Write a gain file as a PEFT (IA)³ adapter folder for ``base``.

    Input-side gains become feedforward modules (input scaled), output-side gains
    non-feedforward modules (output and bias scaled); module names are those of the
    model transformers builds from BASE.

    Args:
        gain: the gain file.
        adapter_dir: the adapter folder to write (appears whole, or not at all).
        base: the base the gain was made for (folder or ``embedded:NAME``).
        base_name: ``base_model_name_or_path`` to record (default: the gain's
            ``base_model``, else BASE; an embedded base as its local folder, so
            ``AutoPeftModelForCausalLM`` can load the adapter).
        overwrite: replace an existing adapter folder.
        allow_negative: accept negative gains.

    Returns:
        An :class:`~gainsurgery.interop.peft.ExportResult`.

    Raises:
        ArchitectureError / PlanError: the gain has no (IA)³ equivalent, or the folder is unusable.

    Example:
        >>> export_peft("legal.safetensors", "adapter/", base="embedded:gemma-3-270m")  # doctest: +SKIP
    """
    from gainsurgery.extras import require_extra

    require_extra("train", "export_peft()")
    from gainsurgery.interop import peft
    from gainsurgery.sources import open_base

    g = gf.load(gain, allow_negative=allow_negative)
    ckpt = open_base(base)
    return peft.export_peft(g, ckpt, adapter_dir, base_name=peft.adapter_base_name(base, g, base_name),
                            overwrite=overwrite, inputs=[gain])


def import_peft(adapter_dir: str | os.PathLike[str], *, base: str, description: str | None = None,
                allow_negative: bool = False) -> GainFile:
    """Turn a PEFT (IA)³ adapter into a gain file keyed by ``base``'s tensor names.

    LoRA and other additive adapters are refused: W + B·A is not a diagonal gain.

    Args:
        adapter_dir: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        base: the base the adapter was trained on (folder or ``embedded:NAME``).
        description: free text stored in the metadata.
        allow_negative: accept negative values.

    Returns:
        The gain (``method`` gain/gain-ffn when the vectors are exactly those targets, else ia3).

    Example:
        >>> save_gain(import_peft("adapter/", base="base/"), "gain.safetensors")  # doctest: +SKIP
    """
    from gainsurgery.extras import require_extra

    require_extra("train", "import_peft()")
    from gainsurgery.interop import peft
    from gainsurgery.sources import open_base

    return peft.import_peft(adapter_dir, open_base(base), base_name=base, allow_negative=allow_negative,
                            description=description)
