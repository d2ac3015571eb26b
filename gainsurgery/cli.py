"""The ``gainsurgery`` command line (click).

Each command parses arguments, calls the library and prints. Errors a user can
cause (:class:`GainSurgeryError`) are printed as one line, exit status 1.
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
from gainsurgery import gainfile as gf
from gainsurgery.errors import GainSurgeryError

MiB = 1 << 20


class _Group(click.Group):
    """Turns user errors into one-line messages and SIGTERM into a clean exit."""

    def invoke(self, ctx: click.Context) -> Any:
        signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return super().invoke(ctx)
        except GainSurgeryError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was left half-written", err=True)
            ctx.exit(130)


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


def _progress(total: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=None,
               file=sys.stderr, leave=False)
    return bar


def _load_gains(paths: tuple[str, ...], allow_negative: bool) -> tuple[gf.GainFile, list[dict[str, Any]]]:
    gains = [gf.load(p, allow_negative=allow_negative) for p in paths]
    sources = [
        {"name": Path(p).name, "path": str(Path(p).resolve()), "sha256": gf.file_sha256(p),
         "method": g.metadata.get("method"), "side": g.metadata.get("side"),
         "base_model": g.metadata.get("base_model"), "parameters": g.num_parameters}
        for p, g in zip(paths, gains)
    ]
    stacked = gains[0] if len(gains) == 1 else gf.stack(gains, [Path(p).name for p in paths])
    return stacked, sources


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


_allow_negative = click.option("--allow-negative", is_flag=True, help="Accept negative gains (sign flips).")
_json = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")


@main.command()
@click.argument("base")
@click.argument("gains_and_out", nargs=-1, required=True, metavar="GAIN [GAIN ...] OUT")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, on success).")
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--verify", "verify_", is_flag=True, help="Fully verify the output before moving it into place.")
@click.option("--chunk-size", default=64, show_default=True, type=click.IntRange(1, 4096),
              help="MiB of tensor data scaled per read; bounds peak memory.")
@click.option("--threads", type=click.IntRange(1, 64), default=None, help="Compute threads (default: CPUs, max 4).")
@_allow_negative
@_json
def apply(base, gains_and_out, overwrite, dry_run, verify_, chunk_size, threads, allow_negative, as_json):
    """Apply (and stack) gain files onto BASE, streaming into OUT.

    BASE is a checkpoint folder (sharded safetensors + index, or one
    model.safetensors) or embedded:gemma-3-270m. Several gains are multiplied in
    float32 and applied in one pass, rounding once to each tensor's dtype.
    Untouched tensors are copied byte for byte; OUT appears only when complete.

    \b
    Example:
      gainsurgery apply base/ gain.safetensors merged/
      gainsurgery apply base/ legal.safetensors medical.safetensors merged/
    """
    from gainsurgery import sources as src
    from gainsurgery.cards import merged_model_card
    from gainsurgery.checkpoint import open_checkpoint
    from gainsurgery.surgery import execute, make_plan, verify

    if len(gains_and_out) < 2:
        raise click.UsageError("give at least one GAIN file and the OUT folder")
    *gain_paths, out = gains_and_out
    ckpt = src.open_base(base)
    gain, sources = _load_gains(tuple(gain_paths), allow_negative)
    plan = make_plan(ckpt, gain, sources, allow_negative=allow_negative)
    if dry_run:
        from gainsurgery.surgery import check_output

        check_output(ckpt.folder, Path(out), overwrite=overwrite)
        summary = plan.summary()
        if as_json:
            _emit_json({"dry_run": True, "out": out, **summary})
        else:
            click.echo(f"plan: {plan.tensors_touched} of {len(ckpt.tensors)} tensors in {len(ckpt.shards)} shard(s)")
            click.echo(f"  rewritten: {_human_bytes(plan.bytes_rewritten)} (scaled in float32, rounded once)")
            click.echo(f"  copied:    {_human_bytes(plan.bytes_copied)} (byte-identical)")
            click.echo(f"  gain parameters: {gain.num_parameters:,}")
            click.echo("dry run: nothing written")
        return

    def check(tmp: Path) -> None:
        report = verify(plan, open_checkpoint(tmp), chunk_bytes=chunk_size * MiB)
        if not report.ok:
            raise GainSurgeryError("verification failed, output discarded: " + report.problems[0])

    bar = _progress(ckpt.total_bytes, "apply")
    try:
        result = execute(plan, out, base_spec=base, overwrite=overwrite, chunk_bytes=chunk_size * MiB,
                         threads=threads, progress=bar.update, card=merged_model_card,
                         check=check if verify_ else None)
    finally:
        bar.close()
    if as_json:
        _emit_json({"out": str(result.out), "seconds": round(result.seconds, 3), "verified": verify_,
                    **{k: v for k, v in plan.summary().items() if k != "touched"},
                    "shards": result.shard_sha256})
    else:
        click.echo(f"wrote {result.out} ({plan.tensors_touched} tensors rescaled, "
                   f"{_human_bytes(ckpt.total_bytes)}, {result.seconds:.1f} s){' - verified' if verify_ else ''}")


@main.command()
@click.argument("base")
@click.argument("gains_and_out", nargs=-1, required=True, metavar="GAIN [GAIN ...] OUT")
@click.option("--chunk-size", default=64, show_default=True, type=click.IntRange(1, 4096), help="MiB per read.")
@_allow_negative
@_json
def verify(base, gains_and_out, chunk_size, allow_negative, as_json):
    """Check that OUT is exactly BASE with the GAIN files applied.

    Recomputes every target tensor (float32 product, rounded once) and compares
    every other tensor, header and the index byte for byte. Exit status 0 only
    if everything matches.

    \b
    Example:
      gainsurgery verify base/ gain.safetensors merged/
    """
    from gainsurgery import sources as src
    from gainsurgery.checkpoint import open_checkpoint
    from gainsurgery.surgery import make_plan, verify as run_verify

    if len(gains_and_out) < 2:
        raise click.UsageError("give at least one GAIN file and the OUT folder")
    *gain_paths, out = gains_and_out
    ckpt = src.open_base(base)
    gain, sources = _load_gains(tuple(gain_paths), allow_negative)
    plan = make_plan(ckpt, gain, sources, allow_negative=allow_negative)
    out_ckpt = open_checkpoint(out)
    bar = _progress(ckpt.total_bytes, "verify")
    try:
        report = run_verify(plan, out_ckpt, chunk_bytes=chunk_size * MiB, progress=bar.update)
    finally:
        bar.close()
    if as_json:
        _emit_json(report.as_dict())
    elif report.ok:
        click.echo(f"ok: {report.tensors_scaled} rescaled tensors match, "
                   f"{report.tensors_checked - report.tensors_scaled} others byte-identical")
    else:
        for problem in report.problems[:20]:
            click.echo(f"mismatch: {problem}", err=True)
        click.echo(f"verification failed: {len(report.problems)} problem(s)", err=True)
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("gains", nargs=-1, required=True, metavar="G1 G2 [...]")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output gain file.")
@click.option("--description", default=None, help="Free text stored in the metadata.")
@_allow_negative
@_json
def stack(gains, output, description, allow_negative, as_json):
    """Compose gain files into one: product on shared tensors, union otherwise.

    \b
    Example:
      gainsurgery stack legal.safetensors medical.safetensors -o both.safetensors
    """
    loaded = [gf.load(p, allow_negative=allow_negative) for p in gains]
    stacked = gf.stack(loaded, [Path(p).name for p in gains])
    for parent, p in zip(stacked.metadata["parents"], gains):
        parent["sha256"] = gf.file_sha256(p)
    if description:
        stacked.metadata["description"] = description
    stacked.save(output)
    info = {"output": output, "parameters": stacked.num_parameters, "tensors": len(stacked.vectors),
            "parents": len(gains)}
    _emit_json(info) if as_json else click.echo(
        f"wrote {output}: {len(stacked.vectors)} tensors, {stacked.num_parameters:,} gains from {len(gains)} files")


@main.command()
@click.argument("gain")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output gain file.")
@_json
def invert(gain, output, as_json):
    """Write the inverse gain file (1/s), which undoes GAIN up to rounding.

    \b
    Example:
      gainsurgery invert gain.safetensors -o gain_inv.safetensors
    """
    g = gf.load(gain, allow_negative=True)
    inv = gf.invert(g)
    inv.metadata["parents"] = [{"name": Path(gain).name, "sha256": gf.file_sha256(gain), "op": "invert"}]
    inv.save(output)
    _emit_json({"output": output, "parameters": inv.num_parameters}) if as_json else click.echo(
        f"wrote {output}: inverse of {inv.num_parameters:,} gains")


@main.command()
@click.argument("gain")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Draw per-layer gain distributions (PNG).")
@_json
def inspect(gain, plot, as_json):
    """Show a gain file: parameter count, statistics per target and per layer, metadata.

    \b
    Example:
      gainsurgery inspect gain.safetensors --plot gains.png
    """
    g = gf.load(gain, allow_negative=True)
    st = gf.stats(g)
    if plot:
        from gainsurgery.plots import plot_gain_distributions

        plot_gain_distributions(g, plot, title=Path(gain).name)
    if as_json:
        _emit_json(st)
        return
    o = st["overall"]
    click.echo(f"{gain}: {st['parameters']:,} gains ({gf.format_count(st['parameters'])}) in {st['tensors']} tensors")
    for key in ("method", "side", "base_model", "base_fingerprint", "description"):
        if key in g.metadata:
            click.echo(f"  {key}: {g.metadata[key]}")
    if "training" in g.metadata:
        click.echo(f"  training: {json.dumps(g.metadata['training'], sort_keys=True)}")
    if "parents" in g.metadata:
        click.echo(f"  parents: {', '.join(str(p.get('name')) for p in g.metadata['parents'])}")
    click.echo(f"  overall: min {o['min']:.4f}  max {o['max']:.4f}  mean {o['mean']:.4f}  "
               f"std {o['std']:.4f}  >1: {o['frac_gt_1']:.1%}")
    click.echo(f"  {'target':<60} {'dim':>3} {'len':>6} {'min':>8} {'max':>8} {'mean':>8} {'std':>8} {'>1':>6}")
    for key, t in st["per_target"].items():
        click.echo(f"  {key:<60} {t['dim']:>3} {t['count']:>6} {t['min']:>8.4f} {t['max']:>8.4f} "
                   f"{t['mean']:>8.4f} {t['std']:>8.4f} {t['frac_gt_1']:>6.1%}")
    if plot:
        click.echo(f"  plot: {plot}")


@main.command()
@click.argument("base")
@click.option("--method", type=click.Choice(["gain", "gain-ffn"]), default="gain-ffn", show_default=True)
@click.option("--side", type=click.Choice(["in", "out"]), default="in", show_default=True,
              help="in: W·diag(s) (paper default); out: diag(s)·W, bias scaled too.")
@click.option("--init", type=click.Choice(["ones"]), default=None, help="Write an identity gain file (needs -o).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Where --init writes.")
@_json
def targets(base, method, side, init, output, as_json):
    """List the tensors GAIN adapts on BASE (reads headers and config.json only).

    \b
    Example:
      gainsurgery targets base/ --method gain-ffn
      gainsurgery targets base/ --init ones -o identity.safetensors
    """
    from gainsurgery import sources as src
    from gainsurgery.architectures import model_type_of, num_layers, resolve_targets
    from gainsurgery.checkpoint import fingerprint

    if (init is None) != (output is None):
        raise click.UsageError("--init and -o/--output go together")
    ckpt = src.open_base(base)
    model_type = model_type_of(ckpt.config)
    found = resolve_targets({n: t.shape for n, t in ckpt.tensors.items()}, model_type, method, side,
                            expected_layers=num_layers(ckpt.config))
    total = sum(t.length for t in found)
    if init:
        meta = {"method": method, "side": side, "base_model": base, "base_fingerprint": fingerprint(ckpt),
                "description": "identity gain (all ones)"}
        gf.identity({t.key: (t.dim, t.length) for t in found}, meta).save(output)
    if as_json:
        _emit_json({"model_type": model_type, "method": method, "side": side, "parameters": total,
                    "targets": [t.__dict__ for t in found], "output": output})
        return
    click.echo(f"{model_type}, method {method}, side {side}: {len(found)} tensors, {total:,} gains")
    for t in found:
        click.echo(f"  {t.key:<64} dim {t.dim}  len {t.length:>6}  {t.kind}")
    if init:
        click.echo(f"wrote {output}")


if __name__ == "__main__":  # pragma: no cover
    main()
