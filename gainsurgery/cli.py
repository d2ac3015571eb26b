"""The ``gainsurgery`` command line (click): parse -> one call -> print.

Each command parses its arguments, makes one call into the library (mostly
:mod:`gainsurgery.api`) and prints the result. Errors a user can cause
(:class:`GainSurgeryError`) are printed as one line, exit status 1; a closed
stdout (``gainsurgery inspect G | head -1``) is a normal end, exit status 0.
Commands that need an optional extra say which one, in one line.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from gainsurgery import __version__
from gainsurgery.architectures.registry import METHODS as GAIN_METHODS
from gainsurgery.architectures.registry import SIDES
from gainsurgery.errors import GainSurgeryError
from gainsurgery.extras import require_extra
from gainsurgery.io.write_errors import no_room_errno, no_room_message
from gainsurgery.training.config import METHODS as TRAIN_METHODS
from gainsurgery.training.distributed import end_launched_process

MiB = 1 << 20


class _Group(click.Group):
    """Turns user errors into one-line messages and SIGTERM into a clean exit."""

    def invoke(self, ctx: click.Context) -> Any:
        from gainsurgery.io.secrets import install_redaction

        signal.signal(signal.SIGTERM, _on_sigterm)
        install_redaction()  # what libraries log or warn, and a bug's traceback, lose credentials too
        try:
            result = self._invoke(ctx)
        except click.exceptions.Exit as done:
            end_launched_process(done.exit_code)  # under torchrun: see there; elsewhere returns
            raise
        end_launched_process(0)
        return result

    def _invoke(self, ctx: click.Context) -> Any:
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
            return result
        except BrokenPipeError:  # the reader went away (`| head`): a normal end for a CLI
            _silence_stdout()
            ctx.exit(0)
        except GainSurgeryError as exc:
            _error(str(exc))
            ctx.exit(1)
        except OSError as exc:  # the environment refused (permissions, missing paths, a full disk...)
            where = f": {exc.filename}" if exc.filename else ""
            code = no_room_errno(exc)
            _error(f"{exc.strerror or exc}{where}" if code is None else
                   no_room_message(code, "the output", os.path.dirname(exc.filename) if exc.filename else None))
            ctx.exit(1)
        except Exception as exc:
            # A library that wraps a full disk or a file-size limit in its own error (safetensors):
            # the command's cleanup has run; say what happened in one line. Anything else is a bug.
            code = no_room_errno(exc)
            if code is None:
                raise
            _error(no_room_message(code, "the output", None))
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was left half-written", err=True)
            ctx.exit(130)


def _one_line(message: str) -> str:
    """``message`` on one line, without credentials: every message the CLI prints passes here.

    URL user-info (``http://user:pw@host``), the current token's value, Bearer
    credentials and ``hf_...`` tokens are masked (:func:`gainsurgery.io.secrets.redact`);
    line breaks and control characters cannot fake a second line.
    """
    from gainsurgery.io.secrets import current_token, redact

    text = " ".join(redact(message, current_token()).split())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _shown(path: Any) -> str:
    """A path the user chose, as a success message shows it (a newline in it cannot fake a line)."""
    from gainsurgery.io.inputs import show_path

    return show_path(str(path))


def _error(message: str) -> None:
    click.echo("error: " + _one_line(message), err=True)


def _warn(message: str) -> None:
    click.echo("warning: " + _one_line(message), err=True)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (e.g. under a test runner)
        pass


def _on_sigterm(signum, frame):  # pragma: no cover - exercised in a subprocess test
    # SystemExit unwinds through the apply's cleanup, removing temporary output.
    raise SystemExit(143)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gainsurgery")
def main() -> None:
    """GAIN model surgery: train, share, stack and apply diagonal gain vectors.

    A gain file scales chosen weights of a base checkpoint: W_new = W·diag(s)
    (arXiv 2604.04516). Commands stream over sharded safetensors checkpoints in
    constant memory.
    """


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


#: Lines of the progress bars shown at once (the Hub-to-Hub pipeline shows one per stage).
_BAR_LINES = {"download": 0, "apply": 1, "upload": 2}


def _progress(desc: str, total: int):
    """A byte progress bar (bytes and rate) on stderr, shown on a terminal only; one line per stage."""
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{desc:<8}", disable=None,
                file=sys.stderr, leave=False, position=_BAR_LINES.get(desc, 0), dynamic_ncols=True)


def _hub():
    """The Hub client for this command: HF_ENDPOINT and the HF cache read now, the token on first use."""
    from gainsurgery.hub.client import HubClient

    return HubClient.from_env()


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


_allow_negative = click.option("--allow-negative", is_flag=True, help="Accept negative gains (sign flips).")
_allow_saturation = click.option(
    "--allow-saturation", is_flag=True,
    help="Accept weights that scaling turns into ±inf or 0 (the product leaves the dtype's range); recorded.")
_allow_base_mismatch = click.option(
    "--allow-base-mismatch", is_flag=True,
    help="Apply a gain whose recorded base fingerprint differs from BASE's weights; warned and recorded.")
_base_model = click.option(
    "--base-model", default=None, metavar="ORG/NAME",
    help="The Hub repo the model card names as base_model (default: a Hub BASE; never a local folder).")
_json = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")


def _names_a_gain(spec: str) -> bool:
    """True when a positional argument of ``apply`` can only be a gain, never OUT (a folder)."""
    from gainsurgery.formats.gguf import is_gguf
    from gainsurgery.hub.refs import parse_file_ref

    from gainsurgery.gainfile import split_power

    if is_gguf(spec):  # a .gguf argument after BASE is OUT (a GGUF BASE's result), never a gain
        return False
    spec = split_power(spec)[0]
    return spec.endswith(".safetensors") or os.path.isfile(spec) or parse_file_ref(spec) is not None


def _split_gains_and_out(args: tuple[str, ...], push_to: str | None) -> tuple[list[str], str | None]:
    """GAIN [GAIN ...] [OUT]: OUT may be left out only with --push, when the last argument names a gain."""
    if push_to and (len(args) == 1 or _names_a_gain(args[-1])):
        return list(args), None
    if len(args) < 2:
        raise click.UsageError("give at least one GAIN file and the OUT folder (or --push REPO without OUT)")
    return list(args[:-1]), args[-1]


@main.command()
@click.argument("base")
@click.argument("gains_and_out", nargs=-1, required=True, metavar="GAIN [GAIN ...] [OUT]")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, on success).")
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--verify", "verify_", is_flag=True, help="Fully verify the output before moving it into place.")
@click.option("--chunk-size", default=None, type=click.IntRange(1, 4096),
              help="MiB of tensor data scaled per read; bounds peak memory. [default: 64; 16 with --push "
                   "and no OUT]")
@click.option("--threads", type=click.IntRange(1, 64), default=None, help="Compute threads (default: CPUs, max 4).")
@click.option("--push", "push_to", default=None, metavar="REPO_ID",
              help="Publish to this Hub repo (one commit) once complete and fully verified. Without OUT: "
                   "stream shard by shard, never more than three shards on disk.")
@click.option("--private", is_flag=True, help="With --push: create the repo private (if it does not exist yet).")
@click.option("--revision", default=None, metavar="BRANCH",
              help="With --push: the branch to commit to (created if missing).")
@click.option("--create-pr", is_flag=True, help="With --push: open a pull request instead of committing.")
@click.option("--commit-message", default=None, metavar="MSG", help="With --push: the commit title.")
@click.option("--work-dir", default=None, metavar="DIR",
              help="With --push and no OUT: where the shards in flight go (default: $TMPDIR).")
@click.option("--keep-types", is_flag=True,
              help="GGUF BASE: re-quantize tensors that need it to their own type, never promote them.")
@click.option("--requant-tolerance", type=click.FloatRange(0, None), default=None, metavar="FRACTION",
              help="GGUF BASE: the largest error re-quantizing a tensor may add, as a fraction of the gain's own "
                   "change to it; beyond it the tensor is promoted to a wider type. [default: 0.1]")
@_allow_negative
@_allow_saturation
@_allow_base_mismatch
@_base_model
@_json
def apply(base, gains_and_out, overwrite, dry_run, verify_, chunk_size, threads, push_to, private, revision,
          create_pr, commit_message, work_dir, keep_types, requant_tolerance, allow_negative, allow_saturation,
          allow_base_mismatch, base_model, as_json):
    """Apply (and stack) gain files onto BASE, streaming into OUT.

    BASE is a checkpoint folder (sharded safetensors + index, or one
    model.safetensors), embedded:gemma-3-270m, or a Hub repo ORG/NAME[@REV]
    (fetched one shard at a time into the HF cache). A GAIN may be a Hub file,
    ORG/REPO[@REV]:path.safetensors. Several gains are multiplied in float32
    and applied in one pass, rounding once to each tensor's dtype. Untouched
    tensors are copied byte for byte; OUT appears only when complete (with
    --push: only once verified and published).

    A BASE ending in .gguf is a GGUF file (llama.cpp's format, quantized or
    not): OUT is then the adapted .gguf file. Column gains are moved exactly onto
    another tensor's rows where the algebra allows (down_proj onto up_proj in a
    gated FFN; o_proj onto v_proj where each head has its own values) and folded
    into block scales; what cannot move is re-quantized, to its own type when that
    keeps the gain (see --requant-tolerance), else to a wider one. --dry-run lists
    every route with its measured error (docs/gguf.md).

    OUT is never BASE, inside it or around it; two runs on one OUT cannot both
    win. A weight that scaling turns into ±inf or 0 is an error naming the
    tensor (--allow-saturation); so is a gain trained on other weights than
    BASE's (its base_tensors_sha256, checked while streaming; --allow-base-mismatch).

    With --push and no OUT, nothing is kept: each shard is downloaded into a
    private work folder (not the HF cache), applied, verified and uploaded while
    the next one downloads, then everything is committed at once (after the same
    checks). A rerun after a kill resumes (shards the Hub already stores are not
    sent again).

    \b
    Example:
      gainsurgery apply base/ gain.safetensors merged/
      gainsurgery apply base/ legal.safetensors medical.safetensors merged/
      gainsurgery apply Qwen/Qwen2.5-0.5B me/qwen-legal-gain:gain.safetensors merged/ --push me/qwen-legal
      gainsurgery apply Qwen/Qwen2.5-0.5B legal.safetensors --push me/qwen-legal --dry-run
      gainsurgery apply gemma-3-270m-Q4_K_M.gguf legal.safetensors legal-Q4_K_M.gguf --verify
    """
    from gainsurgery import api
    from gainsurgery.merge.gguf_sink import GGUFApplyResult

    gain_specs, out = _split_gains_and_out(gains_and_out, push_to)
    result = api.apply(base, gain_specs, out, overwrite=overwrite, verify=verify_, dry_run=dry_run,
                       allow_negative=allow_negative, allow_saturation=allow_saturation,
                       allow_base_mismatch=allow_base_mismatch, base_model=base_model,
                       chunk_bytes=chunk_size * MiB if chunk_size else None, threads=threads, progress=_progress,
                       push_to=push_to, private=private, revision=revision, create_pr=create_pr,
                       commit_message=commit_message, work_dir=work_dir, hub=_hub(), warn=_warn,
                       keep_types=keep_types, requant_tolerance=requant_tolerance)
    if isinstance(result, GGUFApplyResult):
        _print_gguf_apply(result, as_json)
        return
    plan = result.plan
    if result.dry_run:
        summary = {**plan.summary(), "base": result.base}
        if as_json:
            _emit_json({"dry_run": True, "out": out, "push": push_to, **summary,
                        **({"transfer": result.transfer} if result.transfer else {})})
        else:
            click.echo(f"plan: {plan.tensors_touched} of {len(plan.base.tensors)} tensors in "
                       f"{len(plan.base.shards)} shard(s)")
            click.echo(f"  rewritten: {_human_bytes(plan.bytes_rewritten)} (scaled in float32, rounded once)")
            click.echo(f"  copied:    {_human_bytes(plan.bytes_copied)} (byte-identical)")
            click.echo(f"  gain parameters: {plan.gain.num_parameters:,}")
            if result.transfer:
                t = result.transfer
                click.echo(f"  download:  {_human_bytes(t['download_bytes'])} ({t['shards']} shard(s), one at a time)")
                click.echo(f"  upload:    {_human_bytes(t['upload_bytes'])} + {_human_bytes(t['small_files_bytes'])} "
                           f"of small files, through {t['upload_path'].upper()}, then one commit")
                click.echo(f"  peak disk: {_human_bytes(t['peak_disk_bytes'])} in {_shown(t['work_root'])} "
                           "(no OUT, no cache)")
            if push_to:
                click.echo(f"  then push to: {push_to}")
            click.echo("dry run: nothing written")
        return
    if as_json:
        extra = {}
        if result.streamed is not None:
            extra = {"resumed": result.streamed.resumed, "peak_disk_bytes": result.streamed.peak_disk_bytes}
        _emit_json({"out": str(result.out) if result.out is not None else None, "seconds": round(result.seconds, 3),
                    "verified": result.verified, **{k: v for k, v in plan.summary().items() if k != "touched"},
                    "base": result.base, "shards": result.shard_sha256, **extra,
                    **({"pushed": result.pushed.as_dict()} if result.pushed else {})})
    else:
        if result.out is not None:
            click.echo(f"wrote {_shown(result.out)} ({plan.tensors_touched} tensors rescaled, "
                       f"{_human_bytes(plan.base.total_bytes)}, {result.seconds:.1f} s)"
                       f"{' - verified' if result.verified else ''}")
        else:
            resumed = result.streamed.resumed
            click.echo(f"streamed {len(plan.base.shards)} shard(s) to the Hub ({plan.tensors_touched} tensors "
                       f"rescaled, {_human_bytes(plan.base.total_bytes)}, {result.seconds:.1f} s, peak disk "
                       f"{_human_bytes(result.streamed.peak_disk_bytes)}) - verified"
                       + (f"; {len(resumed)} already uploaded by an earlier run" if resumed else ""))
        if result.pushed:
            where = (f"pull request {result.pushed.pr_url}" if result.pushed.pr_url
                     else result.pushed.commit_url or result.pushed.revision)
            click.echo(f"pushed to {result.pushed.repo_id}: {where}")


def _rms(value: Any) -> str:
    return f"{value:.2e}" if isinstance(value, (int, float)) else str(value if value is not None else "-")


def _print_gguf_apply(result: Any, as_json: bool) -> None:
    """What an apply on a GGUF base did (or, dry, would do): routes per gain key, errors per tensor, sizes."""
    from gainsurgery.io.inputs import show_path

    summary = result.summary()
    if as_json:
        _emit_json(summary)
        return
    moved = sum(1 for r in summary["routes"] if r["route"] == "moved")
    click.echo(f"routes: {len(summary['routes'])} gain keys, {moved} moved exactly onto other tensors' rows; "
               f"{summary['tensors_touched']} of {summary['tensors_total']} tensors rewritten")
    for r in summary["routes"]:
        where = f"{show_path(r['key'])} -> {r['tensor']} ({r['type']})"
        if r["route"] == "moved":
            click.echo(f"  {where}: moved onto {r['onto']} ({r['onto_type']}, {r['onto_route']}); {r['why']}")
        else:
            click.echo(f"  {where}: {r['route']}; {r['why']}")
    click.echo(f"  {'tensor':<30} {'route':<10} {'type':<11} {'change':>9} {'added':>9} {'of change':>9} "
               f"{'own quant':>9}   (RMS, weight units)")
    for t in summary["tensors"]:
        types = t["type"] if t["type"] == t["type_out"] else f"{t['type']}>{t['type_out']}"
        share = t["added_vs_change"]
        share_text = f"{100 * share:.2f}%" if isinstance(share, float) else str(share)
        click.echo(f"  {t['tensor']:<30} {t['route']:<10} {types:<11} {_rms(t['change_rms']):>9} "
                   f"{_rms(t['added_rms']):>9} {share_text:>9} {_rms(t['own_quant_rms']):>9}")
    ratio = summary["size_ratio"]
    click.echo(f"  size: {_human_bytes(summary['bytes_base'])} -> {_human_bytes(summary['bytes_out'])} "
               f"({ratio:.4f}x the base)")
    if result.dry_run:
        click.echo("dry run: nothing written")
    else:
        click.echo(f"wrote {_shown(result.out)} ({summary['tensors_touched']} tensors rewritten, "
                   f"{result.seconds:.1f} s){' - verified' if result.verified else ''}")
        if result.pushed:
            where = (f"pull request {result.pushed.pr_url}" if result.pushed.pr_url
                     else result.pushed.commit_url or result.pushed.revision)
            click.echo(f"pushed to {result.pushed.repo_id}: {where}")


@main.command()
@click.argument("base")
@click.argument("gains_and_out", nargs=-1, required=True, metavar="GAIN [GAIN ...] OUT")
@click.option("--chunk-size", default=64, show_default=True, type=click.IntRange(1, 4096), help="MiB per read.")
@_allow_negative
@_allow_saturation
@_json
def verify(base, gains_and_out, chunk_size, allow_negative, allow_saturation, as_json):
    """Check that OUT is exactly BASE with the GAIN files applied.

    Recomputes every target tensor (float32 product, rounded once) and compares
    every other tensor, header and the index byte for byte. With a GGUF BASE
    (.gguf), OUT is the adapted GGUF file: every route is recomputed with the
    options OUT records, every key/value and tensor compared byte for byte. A target whose
    weights scaling turned into ±inf or 0 fails too, unless --allow-saturation
    (as apply was given). OUT must hold exactly the files apply writes: an extra
    shard, file, folder or link, or a missing one, fails (copied files are
    compared with BASE's). Exit status 0 only if everything matches.

    \b
    Example:
      gainsurgery verify base/ gain.safetensors merged/
    """
    from gainsurgery import api

    if len(gains_and_out) < 2:
        raise click.UsageError("give at least one GAIN file and the OUT folder")
    *gain_specs, out = gains_and_out
    report = api.verify(base, gain_specs, out, allow_negative=allow_negative, allow_saturation=allow_saturation,
                        chunk_bytes=chunk_size * MiB, progress=_progress, hub=_hub())
    if as_json:
        _emit_json(report.as_dict())
    elif report.ok:
        click.echo(f"ok: {report.tensors_scaled} rescaled tensors match, "
                   f"{report.tensors_checked - report.tensors_scaled} others byte-identical")
    else:
        for problem in report.problems[:20]:
            click.echo(f"mismatch: {_one_line(problem)}", err=True)
        click.echo(f"verification failed: {len(report.problems)} problem(s)", err=True)
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("source", metavar="FOLDER_OR_GAINFILE")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (if it does not exist yet).")
@click.option("--revision", default=None, metavar="BRANCH", help="Branch to commit to (created if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--commit-message", default=None, metavar="MSG", help="Commit title.")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded; contact nothing.")
@_base_model
@_json
def push(source, repo_id, private, revision, create_pr, commit_message, dry_run, base_model, as_json):
    """Publish a merged folder, a gain file or an adapted GGUF file to the Hugging Face Hub, in one commit.

    A folder must be complete: index (or model.safetensors), every shard with
    the sha256 recorded in gainsurgery.json, config.json. A gain file goes up
    with a generated model card (README.md), and so does a GGUF file adapted by
    apply (its card made from its gainsurgery.record metadata). The token comes from HF_TOKEN or
    `hf auth login`; no file that holds its value is uploaded, nor a link out of
    the folder.

    \b
    Example:
      gainsurgery push merged/ me/qwen-legal --private
      gainsurgery push legal.safetensors me/qwen-legal-gain
    """
    from gainsurgery import api

    plan = api.push(source, repo_id, private=private, revision=revision, create_pr=create_pr,
                    commit_message=commit_message, dry_run=dry_run, base_model=base_model, hub=_hub())
    kind, items, total = plan.kind, plan.items, plan.bytes
    if dry_run:
        if as_json:
            _emit_json({"dry_run": True, "repo_id": repo_id, "revision": revision or "main", "create_pr": create_pr,
                        "kind": kind, "bytes": total,
                        "files": [{"path": i.path_in_repo, "bytes": i.size} for i in items]})
        else:
            click.echo(f"would push {kind} {_shown(source)} to {repo_id} ({revision or 'main'}"
                       f"{', as a pull request' if create_pr else ''}): {len(items)} files, {_human_bytes(total)}")
            for i in items:
                click.echo(f"  {i.path_in_repo:<48} {_human_bytes(i.size):>10}")
            click.echo("dry run: nothing uploaded")
        return
    result = plan.result
    if as_json:
        _emit_json({"kind": kind, "bytes": total, **result.as_dict()})
    else:
        where = f"pull request {result.pr_url}" if result.pr_url else (result.commit_url or result.revision)
        click.echo(f"pushed {kind} to {repo_id} ({len(items)} files, {_human_bytes(total)}): {where}")


@main.command()
@click.argument("gains", nargs=-1, required=True, metavar="G1 G2 [...]")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output gain file.")
@click.option("--description", default=None, help="Free text stored in the metadata.")
@_allow_negative
@_allow_base_mismatch
@_json
def stack(gains, output, description, allow_negative, allow_base_mismatch, as_json):
    """Compose gain files into one: product on shared tensors, union otherwise.

    Each parent's base fingerprint is kept; parents trained on different bases
    are refused unless --allow-base-mismatch. The output is never one of the inputs.

    \b
    Example:
      gainsurgery stack legal.safetensors medical.safetensors -o both.safetensors
    """
    from gainsurgery import api

    stacked = api.stack_gains(gains, allow_negative=allow_negative, description=description,
                              allow_base_mismatch=allow_base_mismatch)
    stacked.save(output, inputs=gains)
    from gainsurgery.gainfile import base_provenance

    covered = base_provenance(stacked, Path(output).name)
    if not covered.complete:  # the stack is as unchecked as its least checked parent: say so now, not at apply
        _warn(f"{Path(output).name} records no base_tensors_sha256 for {len(covered.uncovered)} of its "
              f"{covered.total} tensors (a parent recorded none); apply cannot check those against its base")
    info = {"output": output, "parameters": stacked.num_parameters, "tensors": len(stacked.vectors),
            "parents": len(gains)}
    _emit_json(info) if as_json else click.echo(
        f"wrote {_shown(output)}: {len(stacked.vectors)} tensors, {stacked.num_parameters:,} gains from {len(gains)} files")


@main.command()
@click.argument("gain")
@click.option("--power", "alpha", required=True, type=float, metavar="α",
              help="Write s^α: 0 < α < 1 weakens the adaptation, α > 1 strengthens it, 0 is the identity.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output gain file.")
@_json
def scale(gain, alpha, output, as_json):
    """Write the gain file s^α: dial a trained adaptation down (or up) without retraining.

    apply reads the same thing from a suffix: GAIN.safetensors@α.

    \b
    Example:
      gainsurgery scale legal.safetensors --power 0.5 -o legal-half.safetensors
      gainsurgery apply BASE legal.safetensors@0.5 OUT
    """
    from gainsurgery import api

    out = api.power_gain(gain, alpha)
    out.save(output, inputs=[gain])
    _emit_json({"output": output, "parameters": out.num_parameters, "power": alpha}) if as_json else click.echo(
        f"wrote {_shown(output)}: s^{alpha:g} of {out.num_parameters:,} gains")


@main.command()
@click.argument("gain")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output gain file.")
@_json
def invert(gain, output, as_json):
    """Write the inverse gain file (1/s), which undoes GAIN up to rounding.

    \b
    Example:
      gainsurgery invert gain.safetensors -o gain_inv.safetensors
    """
    from gainsurgery import api

    inv = api.invert_gain(gain)
    inv.save(output, inputs=[gain])
    _emit_json({"output": output, "parameters": inv.num_parameters}) if as_json else click.echo(
        f"wrote {_shown(output)}: inverse of {inv.num_parameters:,} gains")


@main.command()
@click.argument("gain")
@click.option("--plot", type=click.Path(), default=None, help="Draw per-layer gain distributions (PNG).")
@_json
def inspect(gain, plot, as_json):
    """Show a gain file: parameter count, statistics per target and per layer, metadata.

    A .gguf file: its architecture, tensor types and sizes, metadata, and the
    provenance of an adapted one (gains, routes, errors).

    \b
    Example:
      gainsurgery inspect gain.safetensors --plot gains.png
      gainsurgery inspect legal-Q4_K_M.gguf
    """
    from gainsurgery.formats.gguf import is_gguf

    if is_gguf(gain):
        if plot:
            raise click.UsageError("--plot draws gain files, not GGUF files")
        _inspect_gguf(gain, as_json)
        return
    if plot:
        require_extra("plots", "gainsurgery inspect --plot")
    from gainsurgery import api
    from gainsurgery.gainfile import format_count
    from gainsurgery.io.inputs import show_path as show

    st = api.inspect_gain(gain, plot=plot)
    meta = st["metadata"]
    if as_json:
        _emit_json(st)
        return
    o = st["overall"]
    click.echo(f"{show(gain)}: {st['parameters']:,} gains ({format_count(st['parameters'])}) "
               f"in {st['tensors']} tensors")
    # Metadata is someone else's text: control characters (terminal escapes, fake lines) are shown escaped.
    for key in ("method", "side", "base_model", "base_fingerprint", "base_tensors_sha256", "description"):
        if key in meta:
            click.echo(f"  {key}: {show(str(meta[key]))}")
    covered = st["base_coverage"]
    if covered["uncovered"] == covered["tensors"]:
        click.echo("  base_tensors_sha256: none recorded (apply cannot check this gain against its base)")
    elif covered["uncovered"]:
        click.echo(f"  base_tensors_sha256: none recorded for {covered['uncovered']} of its {covered['tensors']} "
                   "tensors (a stacked parent recorded none; apply cannot check those)")
    if "training" in meta:
        click.echo(f"  training: {json.dumps(meta['training'], sort_keys=True)}")
    if "parents" in meta:
        click.echo("  parents: " + ", ".join(
            show(str(p.get('name'))) + (f" (base {show(str(p['base_tensors_sha256']))[:23]}...)"
                                        if p.get("base_tensors_sha256") else "")
            for p in meta["parents"] if isinstance(p, dict)))
    click.echo(f"  overall: min {o['min']:.4f}  max {o['max']:.4f}  mean {o['mean']:.4f}  "
               f"std {o['std']:.4f}  >1: {o['frac_gt_1']:.1%}")
    click.echo(f"  {'target':<60} {'dim':>3} {'len':>6} {'min':>8} {'max':>8} {'mean':>8} {'std':>8} {'>1':>6}")
    for key, t in st["per_target"].items():
        click.echo(f"  {show(key):<60} {t['dim']:>3} {t['count']:>6} {t['min']:>8.4f} {t['max']:>8.4f} "
                   f"{t['mean']:>8.4f} {t['std']:>8.4f} {t['frac_gt_1']:>6.1%}")
    if plot:
        click.echo(f"  plot: {show(plot)}")


def _inspect_gguf(path: str, as_json: bool) -> None:
    from gainsurgery import api
    from gainsurgery.io.inputs import show_path as show

    info = api.inspect_gguf(path)
    if as_json:
        _emit_json(info)
        return
    click.echo(f"{show(path)}: GGUF v{info['version']}, {info['architecture']}, {info['tensors']} tensors, "
               f"{info['weights']:,} weights, {_human_bytes(info['bytes'])}")
    for name, t in info["types"].items():
        click.echo(f"  {name:<8} {t['tensors']:>5} tensors  {_human_bytes(t['bytes']):>10}")
    for key, value in info["metadata"].items():
        click.echo(f"  {show(key)}: {show(str(value))[:160]}")
    record = info["gainsurgery"]
    if record is None:
        click.echo("  gainsurgery: none (not adapted by gainsurgery)")
        return
    gains = ", ".join(f"{show(str(g.get('name')))} (sha256 {str(g.get('sha256', ''))[:12]}...)"
                      for g in record.get("gains") or [] if isinstance(g, dict))
    base = record.get("base") if isinstance(record.get("base"), dict) else {}
    click.echo(f"  gainsurgery: {show(str(record.get('version')))}, base {show(str(base.get('name')))} "
               f"(sha256 {show(str(base.get('sha256', '')))[:12]}...), gains: {gains}")
    for t in record.get("tensors") or []:
        if isinstance(t, dict):
            click.echo(f"    {show(str(t.get('tensor'))):<30} {show(str(t.get('route'))):<10} "
                       f"{show(str(t.get('type')))}>{show(str(t.get('type_out')))}  added {_rms(t.get('added_rms'))}"
                       f" of change {_rms(t.get('change_rms'))}")


@main.command()
@click.argument("base")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training text: .txt (documents split by two blank lines), .jsonl or .parquet. Repeatable.")
@click.option("--method", type=click.Choice(TRAIN_METHODS), default="gain-ffn", show_default=True)
@click.option("--side", type=click.Choice(SIDES), default="in", show_default=True,
              help="GAIN only: in = W·diag(s) (paper); out = diag(s)·W (experiment).")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Gain file (.safetensors) for gain methods; adapter folder for lora/ia3; checkpoint folder for full.")
@click.option("--steps", default=100, show_default=True, type=click.IntRange(1))
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: 5e-3 gains/ia3, 5e-4 lora].")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1), help="Global batch (windows).")
@click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(1))
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(8), help="Tokens per window.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="dtype of the frozen base weights (gains and adapters stay float32).")
@click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]), default=None,
              help="Autocast the forward pass [default: accelerate launch's setting, else no]. fp16 uses loss scaling.")
@click.option("--gradient-checkpointing", is_flag=True,
              help="Recompute layer activations in backward: less memory, ~30% more compute.")
@click.option("--fsdp", is_flag=True, help="Shard the frozen base across processes (FSDP2); launch with torchrun "
              "or accelerate launch.")
@click.option("--streaming", is_flag=True, help="Stream --data in blocks (files larger than memory); each process "
              "reads its own blocks.")
@click.option("--stream-block-bytes", default=8 << 20, show_default=True, type=click.IntRange(1),
              help="Block size of streamed .txt/.jsonl files, in bytes.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--warmup", default=0.1, show_default=True, type=float, help="Fraction of steps (<1) or steps (>=1).")
@click.option("--schedule", type=click.Choice(["cosine", "linear", "constant"]), default="cosine", show_default=True)
@click.option("--eval-data", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Validation text; perplexity is logged before, during and after training.")
@click.option("--eval-every", default=0, type=click.IntRange(0), help="Steps between evaluations (0: start and end).")
@click.option("--eval-windows", default=32, show_default=True, type=click.IntRange(1))
@click.option("--text-field", default="text", show_default=True, help="Field/column holding text in .jsonl/.parquet.")
@click.option("--resume", type=click.Path(exists=True), default=None,
              help="A gain file to start from (gains only; optimizer fresh), or a checkpoint folder from "
                   "--save-every to continue exactly (optimizer, schedule, data position).")
@click.option("--save-every", default=0, show_default=True, type=click.IntRange(0),
              help="Write a training checkpoint every N steps (0: never).")
@click.option("--checkpoint-dir", type=click.Path(), default=None,
              help="Where --save-every writes [default: OUTPUT.checkpoints beside -o].")
@click.option("--log", type=click.Path(dir_okay=False), default=None, help="JSONL training log [default: beside -o].")
@click.option("--lora-rank", default=8, show_default=True, type=click.IntRange(1))
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--overwrite", is_flag=True, help="lora/ia3/full: replace the -o folder if it exists (on success).")
@_json
def train(base, data, method, side, output, steps, lr, batch_size, grad_accum, seq_len, dtype, mixed_precision,
          gradient_checkpointing, fsdp, streaming, stream_block_bytes, seed, warmup, schedule, eval_data, eval_every,
          eval_windows, text_field, resume, save_every, checkpoint_dir, log, lora_rank, no_progress, overwrite, as_json):
    """Train GAIN gains (or a LoRA / IA3 baseline) on domain text.

    The base stays frozen; only one gain per adapted weight is learned (init 1).
    Runs on one CPU/GPU, or across processes with `torchrun` or `accelerate launch`
    (add --fsdp to shard the base; configs/ has ready accelerate configs).

    \b
    Example:
      gainsurgery train embedded:gemma-3-270m --data legal/train.txt \\
          --eval-data legal/validation.txt --steps 200 -o legal.safetensors
    """
    require_extra("train", "gainsurgery train")
    from gainsurgery import api
    from gainsurgery.training import TrainConfig

    cfg = TrainConfig(base=base, data=list(data), output=output, method=method, side=side, steps=steps, lr=lr,
                      batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, dtype=dtype,
                      mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing, fsdp=fsdp,
                      streaming=streaming, stream_block_bytes=stream_block_bytes, seed=seed,
                      warmup=warmup, schedule=schedule, eval_data=list(eval_data), eval_every=eval_every,
                      eval_windows=eval_windows, text_field=text_field, resume=resume, save_every=save_every,
                      checkpoint_dir=checkpoint_dir, log=log, lora_rank=lora_rank, overwrite=overwrite,
                      progress=not no_progress)
    result = api.train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch, one process reports
        return
    if as_json:
        _emit_json(result.__dict__)
        return
    click.echo(f"trained {method}: {result.trainable_parameters:,} parameters, {result.steps} steps, "
               f"final loss {result.final_loss:.4f}, {result.seconds_per_step:.2f} s/step")
    for row in result.eval:
        click.echo("  eval step {}: ".format(row["step"]) + ", ".join(
            f"{k.split('/', 1)[1]} ppl {v:.3f}" for k, v in row.items() if k != "step"))
    click.echo(f"wrote {_shown(output)}")


@main.command()
@click.option("--workdir", type=click.Path(), default="gainsurgery-demo", show_default=True,
              help="Where the gain file, merged model and logs go.")
@click.option("--model", default="embedded:gemma-3-270m", show_default=True, help="Base model.")
@click.option("--domain", default="legal", show_default=True, help="Domain to adapt to (see scripts/fetch_domains.py).")
@click.option("--other", default="code", show_default=True, help="A different domain, to watch for forgetting.")
@click.option("--method", type=click.Choice(GAIN_METHODS), default="gain-ffn", show_default=True)
@click.option("--steps", default=30, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1))
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(8))
@click.option("--eval-windows", default=16, show_default=True, type=click.IntRange(1))
def demo(workdir, model, domain, other, method, steps, batch_size, seq_len, eval_windows):
    """The whole workflow on the embedded Gemma 3 270M, in minutes on a CPU.

    Fetches real domain text, trains GAIN-FFN briefly, saves the gain file,
    applies it by streaming, verifies the merged checkpoint and compares
    perplexity before and after on the trained and on a different domain.
    """
    require_extra("demo", "gainsurgery demo")
    from gainsurgery.demo import DemoConfig, run_demo

    run_demo(DemoConfig(workdir=Path(workdir), model=model, domain=domain, other=other, method=method,
                        steps=steps, batch_size=batch_size, seq_len=seq_len, eval_windows=eval_windows),
             say=click.echo)


@main.command(name="eval")
@click.argument("model")
@click.option("--gain", "gains", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Gain file(s) applied as forward hooks (no merge). Repeatable; stacked.")
@click.option("--base", default=None, help="Base model for a PEFT adapter MODEL (default: from its config).")
@click.option("--data", "data", multiple=True, metavar="NAME=FILE", help="Held-out text per domain. Repeatable.")
@click.option("--yesno", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSONL with passage/question/answer(yes|no) for zero-shot accuracy.")
@click.option("--yesno-limit", type=click.IntRange(1), default=None, help="Score only the first N yes/no items.")
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(8))
@click.option("--max-windows", default=32, show_default=True, type=click.IntRange(1), help="Windows per domain.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--text-field", default="text", show_default=True)
@click.option("--json", "json_out", type=click.Path(), default=None, help="Also write results here.")
def evaluate(model, gains, base, data, yesno, yesno_limit, seq_len, max_windows, batch_size, dtype, text_field,
             json_out):
    """Perplexity per domain (and yes/no accuracy) of MODEL, optionally with gains.

    MODEL is a checkpoint folder (base or merged), embedded:gemma-3-270m, or a
    PEFT adapter folder.

    \b
    Example:
      gainsurgery eval embedded:gemma-3-270m --gain legal.safetensors \\
          --data legal=legal/validation.txt --data code=code/validation.txt
    """
    if not data and not yesno:
        raise click.UsageError("give --data NAME=FILE and/or --yesno FILE")
    domains = {}
    for item in data:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.UsageError(f"--data takes NAME=FILE, got {item!r}")
        domains[name] = path
    require_extra("train", "gainsurgery eval")
    from gainsurgery import api
    from gainsurgery.io.checks import check_output

    from gainsurgery.sources import local_folder_of

    inputs = [local_folder_of(model), local_folder_of(base), *gains, *domains.values(), yesno]
    if json_out:  # checked before the models are loaded, and again when written
        check_output(json_out, inputs=inputs, kind="file", what="--json file")

    results = api.evaluate(model, gains=list(gains), base=base, data=domains, yesno=yesno, yesno_limit=yesno_limit,
                           seq_len=seq_len, max_windows=max_windows, batch_size=batch_size, dtype=dtype,
                           text_field=text_field)
    click.echo(f"{'domain':<16} {'ppl':>10} {'nll':>8} {'tokens':>8}")
    for name, r in results["domains"].items():
        click.echo(f"{name:<16} {r['ppl']:>10.3f} {r['nll']:>8.4f} {r['tokens']:>8}")
    if yesno:
        y = results["yesno"]
        click.echo(f"yes/no accuracy: {y['accuracy']:.3f} on {y['items']} items (said yes {y['predicted_yes']:.0%})")
    if json_out:
        from gainsurgery.io.atomic import write_json

        write_json(json_out, results, inputs=inputs, what="--json file")


@main.command()
@click.argument("base")
@click.option("--method", type=click.Choice(GAIN_METHODS), default="gain-ffn", show_default=True)
@click.option("--side", type=click.Choice(SIDES), default="in", show_default=True,
              help="in: W·diag(s) (paper default); out: diag(s)·W, bias scaled too.")
@click.option("--init", type=click.Choice(["ones"]), default=None, help="Write an identity gain file (needs -o).")
@click.option("-o", "--output", type=click.Path(), default=None, help="Where --init writes.")
@_json
def targets(base, method, side, init, output, as_json):
    """List the tensors GAIN adapts on BASE (reads headers and config.json only).

    A GGUF BASE (.gguf) lists them under their checkpoint names (what a gain file
    holds), each with its GGUF tensor, type and the route a gain there takes.

    \b
    Example:
      gainsurgery targets base/ --method gain-ffn
      gainsurgery targets base/ --init ones -o identity.safetensors
    """
    from gainsurgery import api

    if (init is None) != (output is None):
        raise click.UsageError("--init and -o/--output go together")
    found = api.targets(base, method, side, hub=_hub(), fingerprint=bool(init))
    if init:
        if found.base_tensors_sha256 is None:
            _warn(f"{output}: a Hub base's weights are not downloaded here, so this identity gain records no "
                  "base_tensors_sha256")
        found.identity().save(output, inputs=found.inputs)
    model_type, total = found.model_type, found.parameters
    if as_json:
        _emit_json({"model_type": model_type, "method": method, "side": side, "parameters": total,
                    "targets": [{**t.__dict__, **({"gguf": found.gguf[t.key]} if found.gguf else {})}
                                for t in found.targets], "output": output})
        return
    click.echo(f"{model_type}, method {method}, side {side}: {len(found.targets)} tensors, {total:,} gains")
    for t in found.targets:
        where = ""
        if found.gguf and t.key in found.gguf:
            w = found.gguf[t.key]
            route = f"moved onto {w['onto']} ({w['onto_type']}, {w['onto_route']})" if w["route"] == "moved" \
                else w["route"]
            where = f"  {w['tensor']} {w['type']}: {route}"
        click.echo(f"  {t.key:<64} dim {t.dim}  len {t.length:>6}  {t.kind}{where}")
    if init:
        click.echo(f"wrote {_shown(output)}")


@main.command("export-peft")
@click.argument("gain")
@click.argument("adapter_dir")
@click.option("--base", required=True, help="The base the gain was made for (folder or embedded:NAME).")
@click.option("--base-name", default=None,
              help="base_model_name_or_path to record (default: the gain's base_model, else BASE).")
@click.option("--overwrite", is_flag=True, help="Replace ADAPTER_DIR if it exists (atomically, on success).")
@_allow_negative
@_json
def export_peft(gain, adapter_dir, base, base_name, overwrite, allow_negative, as_json):
    """Write GAIN as a PEFT (IA)^3 adapter folder for BASE.

    Input-side gains become feedforward modules (input scaled), output-side
    gains non-feedforward modules (output and bias scaled). Module names are
    those of the model transformers builds from BASE.

    \b
    Example:
      gainsurgery export-peft gain.safetensors adapter/ --base base/
    """
    require_extra("train", "gainsurgery export-peft")
    from gainsurgery import api

    result = api.export_peft(gain, adapter_dir, base=base, base_name=base_name, overwrite=overwrite,
                             allow_negative=allow_negative)
    cfg = result.config
    if as_json:
        _emit_json({"adapter_dir": str(result.adapter_dir), "parameters": result.num_parameters,
                    "modules": len(result.modules), "target_modules": cfg["target_modules"],
                    "feedforward_modules": cfg["feedforward_modules"], "fan_in_fan_out": cfg["fan_in_fan_out"]})
    else:
        click.echo(f"wrote {_shown(result.adapter_dir)}: IA3 adapter, {len(result.modules)} modules, "
                   f"{result.num_parameters:,} values (targets {', '.join(cfg['target_modules'])}; "
                   f"feedforward {', '.join(cfg['feedforward_modules']) or 'none'})")


@main.command("import-peft")
@click.argument("adapter_dir")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output gain file.")
@click.option("--base", required=True, help="The base the adapter was trained on (folder or embedded:NAME).")
@click.option("--description", default=None, help="Free text stored in the metadata.")
@_allow_negative
@_json
def import_peft(adapter_dir, output, base, description, allow_negative, as_json):
    """Turn a PEFT (IA)^3 adapter into a gain file keyed by BASE's tensor names.

    LoRA and other additive adapters are refused: W + B·A is not a diagonal gain.

    \b
    Example:
      gainsurgery import-peft adapter/ -o gain.safetensors --base base/
    """
    require_extra("train", "gainsurgery import-peft")
    from gainsurgery import api

    g = api.import_peft(adapter_dir, base=base, description=description, allow_negative=allow_negative)
    g.save(output, inputs=[adapter_dir, base])
    if as_json:
        _emit_json({"output": output, "parameters": g.num_parameters, "tensors": len(g.vectors),
                    "method": g.metadata.get("method"), "side": g.metadata.get("side")})
    else:
        click.echo(f"wrote {_shown(output)}: {len(g.vectors)} tensors, {g.num_parameters:,} gains "
                   f"(method {g.metadata.get('method')}, side {g.metadata.get('side')})")


if __name__ == "__main__":  # pragma: no cover
    main()
