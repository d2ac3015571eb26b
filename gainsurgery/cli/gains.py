"""Commands on gain files: ``stack``, ``scale``, ``invert``, ``inspect``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from gainsurgery import api
from gainsurgery.cli.group import (emit_json, human_bytes, main, opt_allow_base_mismatch, opt_allow_negative, opt_json,
                                   rms_text, shown, warn)
from gainsurgery.extras import require_extra
from gainsurgery.io.inputs import show_path as show
from gainsurgery.sources.spec import names_gguf


@main.command()
@click.argument("gains", nargs=-1, required=True, metavar="G1 G2 [...]")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output gain file.")
@click.option("--description", default=None, help="Free text stored in the metadata.")
@opt_allow_negative
@opt_allow_base_mismatch
@opt_json
def stack(gains, output, description, allow_negative, allow_base_mismatch, as_json):
    """Compose gain files into one: product on shared tensors, union otherwise.

    Each parent's base fingerprint is kept; parents trained on different bases
    are refused unless --allow-base-mismatch. The output is never one of the inputs.

    \b
    Example:
      gainsurgery stack legal.safetensors medical.safetensors -o both.safetensors
    """
    stacked = api.stack_gains(gains, allow_negative=allow_negative, description=description,
                              allow_base_mismatch=allow_base_mismatch)
    stacked.save(output, inputs=gains)
    from gainsurgery.gainfile import base_provenance  # numpy: not at import (see cli.checkpoints)

    covered = base_provenance(stacked, Path(output).name)
    if not covered.complete:  # the stack is as unchecked as its least checked parent: say so now, not at apply
        warn(f"{Path(output).name} records no base_tensors_sha256 for {len(covered.uncovered)} of its "
             f"{covered.total} tensors (a parent recorded none); apply cannot check those against its base")
    info = {"output": output, "parameters": stacked.num_parameters, "tensors": len(stacked.vectors),
            "parents": len(gains)}
    emit_json(info) if as_json else click.echo(
        f"wrote {shown(output)}: {len(stacked.vectors)} tensors, {stacked.num_parameters:,} gains from {len(gains)} files")


@main.command()
@click.argument("gain")
@click.option("--power", "alpha", required=True, type=float, metavar="α",
              help="Write s^α: 0 < α < 1 weakens the adaptation, α > 1 strengthens it, 0 is the identity.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output gain file.")
@opt_json
def scale(gain, alpha, output, as_json):
    """Write the gain file s^α: dial a trained adaptation down (or up) without retraining.

    apply reads the same thing from a suffix: GAIN.safetensors@α.

    \b
    Example:
      gainsurgery scale legal.safetensors --power 0.5 -o legal-half.safetensors
      gainsurgery apply BASE legal.safetensors@0.5 OUT
    """
    out = api.power_gain(gain, alpha)
    out.save(output, inputs=[gain])
    emit_json({"output": output, "parameters": out.num_parameters, "power": alpha}) if as_json else click.echo(
        f"wrote {shown(output)}: s^{alpha:g} of {out.num_parameters:,} gains")


@main.command()
@click.argument("gain")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output gain file.")
@opt_json
def invert(gain, output, as_json):
    """Write the inverse gain file (1/s), which undoes GAIN up to rounding.

    \b
    Example:
      gainsurgery invert gain.safetensors -o gain_inv.safetensors
    """
    inv = api.invert_gain(gain)
    inv.save(output, inputs=[gain])
    emit_json({"output": output, "parameters": inv.num_parameters}) if as_json else click.echo(
        f"wrote {shown(output)}: inverse of {inv.num_parameters:,} gains")


@main.command()
@click.argument("gain")
@click.option("--plot", type=click.Path(), default=None, help="Draw per-layer gain distributions (PNG).")
@opt_json
def inspect(gain, plot, as_json):
    """Show a gain file: parameter count, statistics per target and per layer, metadata.

    A .gguf file: its architecture, tensor types and sizes, metadata, and the
    provenance of an adapted one (gains, routes, errors).

    \b
    Example:
      gainsurgery inspect gain.safetensors --plot gains.png
      gainsurgery inspect legal-Q4_K_M.gguf
    """
    if names_gguf(gain):
        if plot:
            raise click.UsageError("--plot draws gain files, not GGUF files")
        _inspect_gguf(gain, as_json)
        return
    if plot:
        require_extra("plots", "gainsurgery inspect --plot")

    from gainsurgery.gainfile import format_count  # numpy: not at import (see cli.checkpoints)

    st = api.inspect_gain(gain, plot=plot)
    meta = st["metadata"]
    if as_json:
        emit_json(st)
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

    info = api.inspect_gguf(path)
    if as_json:
        emit_json(info)
        return
    click.echo(f"{show(path)}: GGUF v{info['version']}, {info['architecture']}, {info['tensors']} tensors, "
               f"{info['weights']:,} weights, {human_bytes(info['bytes'])}")
    for name, t in info["types"].items():
        click.echo(f"  {name:<8} {t['tensors']:>5} tensors  {human_bytes(t['bytes']):>10}")
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
                       f"{show(str(t.get('type')))}>{show(str(t.get('type_out')))}  "
                       f"added {rms_text(t.get('added_rms'))}"
                       f" of change {rms_text(t.get('change_rms'))}")
