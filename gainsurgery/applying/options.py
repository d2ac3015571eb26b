"""How an apply runs: :class:`ApplyOptions`, declared once, checked when made.

The command line builds one from its flags, :func:`gainsurgery.api.apply` from its
keyword arguments, and the pipeline (:func:`gainsurgery.applying.pipeline.apply`)
takes nothing else: a value no apply accepts cannot be made into options, and the
checks that need the BASE and OUT (:meth:`ApplyOptions.check_for`) run at the start
of every apply.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Any

from gainsurgery.errors import GainSurgeryError, PlanError
from gainsurgery.hub.refs import check_repo_id
from gainsurgery.io.inputs import show_path
from gainsurgery.sources.spec import BaseSpec, names_gguf

MiB = 1 << 20
#: The largest read an apply makes at once, in bytes (``--chunk-size`` is 1 to 4096 MiB).
MAX_CHUNK_BYTES = 4096 * MiB
#: The most compute threads an apply uses (``--threads``).
MAX_THREADS = 64

_FLAGS = ("overwrite", "verify", "dry_run", "allow_negative", "allow_saturation", "allow_base_mismatch", "private",
          "create_pr", "keep_types")


@dataclass(frozen=True)
class ApplyOptions:
    """How to apply gains to a BASE: every option of ``gainsurgery apply``, in one place.

    Attributes:
        overwrite: replace an existing OUT (atomically, on success).
        verify: recompute every rescaled tensor and compare every other byte before OUT appears
            (always done when pushing).
        dry_run: plan only (checks OUT too); write nothing.
        allow_negative: accept negative gains.
        allow_saturation: write weights that scaling turns into ±inf or 0 (recorded) instead of failing.
        allow_base_mismatch: apply a gain whose recorded base fingerprint differs from this
            base's target tensors (warned, recorded) instead of failing.
        base_model: the Hub repo id the model card names as ``base_model`` (default: a Hub
            base, or the repo of a Hugging Face cache snapshot; none for a local folder).
        chunk_bytes: bytes of tensor data scaled per read, 1 byte to 4 GiB; bounds peak memory
            (None: 64 MiB, or 16 MiB without OUT, where the network sets the pace).
        threads: compute threads, 1 to 64 (None: CPUs, at most 4).
        work_dir: with ``push_to`` and no OUT, where the work folder goes (None: ``$TMPDIR``).
        push_to: also publish the result to this Hub repo (verified first); without OUT,
            stream it there shard by shard.
        private: with ``push_to``, create the repo private.
        revision: with ``push_to``, the branch to commit to (created if missing).
        create_pr: with ``push_to``, open a pull request instead of committing.
        commit_message: with ``push_to``, the commit title.
        keep_types: GGUF BASE only: re-quantize to each tensor's own type, never promote.
        requant_tolerance: GGUF BASE only: the largest error re-quantizing may add, as a
            fraction of the gain's own change (None: 0.1); beyond it a tensor is promoted.

    Raises:
        GainSurgeryError: (when made) a value no apply accepts, or options that do not go together.

    Example:
        >>> ApplyOptions(verify=True, chunk_bytes=16 << 20).verify
        True
        >>> ApplyOptions(revision="dev")
        Traceback (most recent call last):
        ...
        gainsurgery.errors.GainSurgeryError: --revision, --create-pr and --commit-message go with --push
    """

    overwrite: bool = False
    verify: bool = False
    dry_run: bool = False
    allow_negative: bool = False
    allow_saturation: bool = False
    allow_base_mismatch: bool = False
    base_model: str | None = None
    chunk_bytes: int | None = None
    threads: int | None = None
    work_dir: str | os.PathLike[str] | None = None
    push_to: str | None = None
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    keep_types: bool = False
    requant_tolerance: float | None = None

    def __post_init__(self) -> None:
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise GainSurgeryError(f"{name} must be True or False, not {type(getattr(self, name)).__name__}")
        chunk = self.chunk_bytes
        if chunk is not None and not (_is_int(chunk) and 1 <= chunk <= MAX_CHUNK_BYTES):
            raise GainSurgeryError(f"chunk size must be 1 byte to 4096 MiB, not {self.chunk_bytes!r}")
        if self.threads is not None and not (_is_int(self.threads) and 1 <= self.threads <= MAX_THREADS):
            raise GainSurgeryError(f"threads must be 1 to {MAX_THREADS}, not {self.threads!r}")
        tol = self.requant_tolerance
        if tol is not None and not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and math.isfinite(tol)
                                    and tol >= 0):
            raise GainSurgeryError(f"--requant-tolerance must be a finite fraction >= 0, not {tol!r}")
        if self.push_to:
            check_repo_id(self.push_to)
        elif self.revision or self.create_pr or self.commit_message:
            raise GainSurgeryError("--revision, --create-pr and --commit-message go with --push")
        if self.base_model is not None:
            check_repo_id(self.base_model, what="--base-model")

    def check_for(self, base: str | os.PathLike[str] | BaseSpec, out: str | os.PathLike[str] | None) -> None:
        """Refuse options that do not fit this BASE's format and OUT (``--overwrite`` without OUT...).

        Only the spelling of BASE counts here (a name ending in ``.gguf`` is a GGUF file), so
        these come first, before BASE is classified or opened; a push over the base's
        own branch is :meth:`check_push_target`'s.

        Raises:
            GainSurgeryError: for example ``--overwrite`` without OUT, or ``--keep-types`` on a folder BASE.
        """
        gguf = base.is_gguf if isinstance(base, BaseSpec) else names_gguf(base)
        if gguf:
            if self.work_dir is not None:
                raise GainSurgeryError("--work-dir is for a safetensors BASE pushed without OUT; a GGUF result is "
                                       "written to OUT (and pushed from there)")
            if out is None:
                raise (GainSurgeryError if self.push_to else PlanError)(
                    "give OUT, the .gguf file to write" + ("; --push uploads it once it is verified"
                                                           if self.push_to else ""))
            if not names_gguf(out):
                raise PlanError(f"OUT {show_path(out)} must be a .gguf file when BASE is one (the result is a GGUF "
                                "file)")
            return
        if self.keep_types or self.requant_tolerance is not None:
            raise GainSurgeryError("--keep-types and --requant-tolerance are for a GGUF BASE (a .gguf file)")
        if out is not None and names_gguf(out):
            raise GainSurgeryError("OUT ends in .gguf, but BASE is a safetensors checkpoint, whose result is a "
                                   "folder; to adapt a GGUF file, give the .gguf file as BASE")
        if out is None and self.overwrite:
            raise GainSurgeryError("--overwrite goes with OUT; without OUT nothing local is written")
        if out is not None and self.work_dir is not None:
            raise GainSurgeryError("--work-dir goes with --push and no OUT (the shards in flight); with OUT, the "
                                   "output is written beside OUT")
        if out is None and not self.push_to:
            raise PlanError("give OUT (a folder to write), or a repo to push to (--push) to stream the result "
                            "to the Hub without one")

    def check_push_target(self, base: BaseSpec) -> None:
        """A merged model never replaces its own base: same repo and branch is refused (a PR or another branch is fine).

        Raises:
            GainSurgeryError: ``push_to`` is BASE's own Hub repo and branch.
        """
        if not self.push_to or base.kind != "hub" or self.create_pr \
                or str(base.repo_id).lower() != self.push_to.lower():
            return
        if (self.revision or "main") != (base.revision or "main"):
            return
        if base.is_gguf:
            raise GainSurgeryError(f"--push {self.push_to} would commit the adapted model into its own base's repo "
                                   "and branch; push to another repo, another branch (--revision) or a pull request "
                                   "(--create-pr)")
        raise GainSurgeryError(f"--push {self.push_to} would commit the merged model over its own base "
                               f"({base.spec}); push to another repo, another branch (--revision) or a pull "
                               "request (--create-pr)")

    def as_dict(self) -> dict[str, Any]:
        """The options as plain values (``work_dir`` as text)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["work_dir"] is not None:
            out["work_dir"] = os.fspath(out["work_dir"])
        return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
