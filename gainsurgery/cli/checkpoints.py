"""Commands on checkpoints: ``apply``, ``verify``, ``targets``."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from gainsurgery import api
from gainsurgery.applying.options import MiB, ApplyOptions
from gainsurgery.applying.result import GGUFApplyResult
from gainsurgery.architectures.registry import METHODS as GAIN_METHODS
from gainsurgery.architectures.registry import SIDES
from gainsurgery.cli.group import (emit_json, human_bytes, hub_client, main, one_line, opt_allow_base_mismatch,
                                   opt_allow_negative, opt_allow_saturation, opt_base_model, opt_json, progress_bar,
                                   rms_text, shown, warn)
from gainsurgery.hub.refs import parse_file_ref
from gainsurgery.io.inputs import show_path
from gainsurgery.sources.spec import names_gguf


def _names_a_gain(spec: str) -> bool:
    """True when a positional argument of ``apply`` can only be a gain, never OUT (a folder)."""
    if names_gguf(spec):  # a .gguf argument after BASE is OUT (a GGUF BASE's result), never a gain
        return False
    # gainfile imports numpy (a tenth of a second): not at import, so `gainsurgery --help` stays quick.
    from gainsurgery.gainfile import split_power

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
@opt_allow_negative
@opt_allow_saturation
@opt_allow_base_mismatch
@opt_base_model
@opt_json
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
    gain_specs, out = _split_gains_and_out(gains_and_out, push_to)
    options = ApplyOptions(overwrite=overwrite, verify=verify_, dry_run=dry_run, allow_negative=allow_negative,
                           allow_saturation=allow_saturation, allow_base_mismatch=allow_base_mismatch,
                           base_model=base_model, chunk_bytes=chunk_size * MiB if chunk_size else None,
                           threads=threads, work_dir=work_dir, push_to=push_to, private=private, revision=revision,
                           create_pr=create_pr, commit_message=commit_message, keep_types=keep_types,
                           requant_tolerance=requant_tolerance)
    result = api.apply(base, gain_specs, out, options=options, progress=progress_bar, hub=hub_client(), warn=warn)
    if isinstance(result, GGUFApplyResult):
        _print_gguf_apply(result, as_json)
        return
    plan = result.plan
    if result.dry_run:
        summary = {**plan.summary(), "base": result.base}
        if as_json:
            emit_json({"dry_run": True, "out": out, "push": push_to, **summary,
                       **({"transfer": result.transfer} if result.transfer else {})})
        else:
            click.echo(f"plan: {plan.tensors_touched} of {len(plan.base.tensors)} tensors in "
                       f"{len(plan.base.shards)} shard(s)")
            click.echo(f"  rewritten: {human_bytes(plan.bytes_rewritten)} (scaled in float32, rounded once)")
            click.echo(f"  copied:    {human_bytes(plan.bytes_copied)} (byte-identical)")
            click.echo(f"  gain parameters: {plan.gain.num_parameters:,}")
            if result.transfer:
                t = result.transfer
                click.echo(f"  download:  {human_bytes(t['download_bytes'])} ({t['shards']} shard(s), one at a time)")
                click.echo(f"  upload:    {human_bytes(t['upload_bytes'])} + {human_bytes(t['small_files_bytes'])} "
                           f"of small files, through {t['upload_path'].upper()}, then one commit")
                click.echo(f"  peak disk: {human_bytes(t['peak_disk_bytes'])} in {shown(t['work_root'])} "
                           "(no OUT, no cache)")
            if push_to:
                click.echo(f"  then push to: {push_to}")
            click.echo("dry run: nothing written")
        return
    if as_json:
        extra = {}
        if result.peak_disk_bytes is not None:
            extra = {"resumed": result.resumed, "peak_disk_bytes": result.peak_disk_bytes}
        emit_json({"out": str(result.out) if result.out is not None else None, "seconds": round(result.seconds, 3),
                   "verified": result.verified, **{k: v for k, v in plan.summary().items() if k != "touched"},
                   "base": result.base, "shards": result.shard_sha256, **extra,
                   **({"pushed": result.pushed.as_dict()} if result.pushed else {})})
    else:
        if result.out is not None:
            click.echo(f"wrote {shown(result.out)} ({plan.tensors_touched} tensors rescaled, "
                       f"{human_bytes(plan.base.total_bytes)}, {result.seconds:.1f} s)"
                       f"{' - verified' if result.verified else ''}")
        else:
            resumed = result.resumed
            click.echo(f"streamed {len(plan.base.shards)} shard(s) to the Hub ({plan.tensors_touched} tensors "
                       f"rescaled, {human_bytes(plan.base.total_bytes)}, {result.seconds:.1f} s, peak disk "
                       f"{human_bytes(result.peak_disk_bytes or 0)}) - verified"
                       + (f"; {len(resumed)} already uploaded by an earlier run" if resumed else ""))
        if result.pushed:
            where = (f"pull request {result.pushed.pr_url}" if result.pushed.pr_url
                     else result.pushed.commit_url or result.pushed.revision)
            click.echo(f"pushed to {result.pushed.repo_id}: {where}")


def _print_gguf_apply(result: Any, as_json: bool) -> None:
    """What an apply on a GGUF base did (or, dry, would do): routes per gain key, errors per tensor, sizes."""
    summary = result.summary()
    if as_json:
        emit_json(summary)
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
        click.echo(f"  {t['tensor']:<30} {t['route']:<10} {types:<11} {rms_text(t['change_rms']):>9} "
                   f"{rms_text(t['added_rms']):>9} {share_text:>9} {rms_text(t['own_quant_rms']):>9}")
    ratio = summary["size_ratio"]
    click.echo(f"  size: {human_bytes(summary['bytes_base'])} -> {human_bytes(summary['bytes_out'])} "
               f"({ratio:.4f}x the base)")
    if result.dry_run:
        click.echo("dry run: nothing written")
    else:
        click.echo(f"wrote {shown(result.out)} ({summary['tensors_touched']} tensors rewritten, "
                   f"{result.seconds:.1f} s){' - verified' if result.verified else ''}")
        if result.pushed:
            where = (f"pull request {result.pushed.pr_url}" if result.pushed.pr_url
                     else result.pushed.commit_url or result.pushed.revision)
            click.echo(f"pushed to {result.pushed.repo_id}: {where}")


@main.command()
@click.argument("base")
@click.argument("gains_and_out", nargs=-1, required=True, metavar="GAIN [GAIN ...] OUT")
@click.option("--chunk-size", default=64, show_default=True, type=click.IntRange(1, 4096), help="MiB per read.")
@opt_allow_negative
@opt_allow_saturation
@opt_json
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
    if len(gains_and_out) < 2:
        raise click.UsageError("give at least one GAIN file and the OUT folder")
    *gain_specs, out = gains_and_out
    report = api.verify(base, gain_specs, out, allow_negative=allow_negative, allow_saturation=allow_saturation,
                        chunk_bytes=chunk_size * MiB, progress=progress_bar, hub=hub_client())
    if as_json:
        emit_json(report.as_dict())
    elif report.ok:
        click.echo(f"ok: {report.tensors_scaled} rescaled tensors match, "
                   f"{report.tensors_checked - report.tensors_scaled} others byte-identical")
    else:
        for problem in report.problems[:20]:
            click.echo(f"mismatch: {one_line(problem)}", err=True)
        click.echo(f"verification failed: {len(report.problems)} problem(s)", err=True)
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("base")
@click.option("--method", type=click.Choice(GAIN_METHODS), default="gain-ffn", show_default=True)
@click.option("--side", type=click.Choice(SIDES), default="in", show_default=True,
              help="in: W·diag(s) (paper default); out: diag(s)·W, bias scaled too.")
@click.option("--init", type=click.Choice(["ones"]), default=None, help="Write an identity gain file (needs -o).")
@click.option("-o", "--output", type=click.Path(), default=None, help="Where --init writes.")
@opt_json
def targets(base, method, side, init, output, as_json):
    """List the tensors GAIN adapts on BASE (reads headers and config.json only).

    A GGUF BASE (.gguf) lists them under their checkpoint names (what a gain file
    holds), each with its GGUF tensor, type and the route a gain there takes.

    \b
    Example:
      gainsurgery targets base/ --method gain-ffn
      gainsurgery targets base/ --init ones -o identity.safetensors
    """
    if (init is None) != (output is None):
        raise click.UsageError("--init and -o/--output go together")
    found = api.targets(base, method, side, hub=hub_client(), fingerprint=bool(init))
    if init:
        if found.base_tensors_sha256 is None:
            warn(f"{output}: a Hub base's weights are not downloaded here, so this identity gain records no "
                 "base_tensors_sha256")
        found.identity().save(output, inputs=found.inputs)
    model_type, total = found.model_type, found.parameters
    if as_json:
        emit_json({"model_type": model_type, "method": method, "side": side, "parameters": total,
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
        click.echo(f"wrote {shown(output)}")
