#!/usr/bin/env python
"""Sequential adaptation over K domains: how much does each method forget?

Thin command line over :mod:`gainsurgery_lab.forgetting` (methods, staging,
metrics, resume: see its docstring and docs/results/forgetting.md). Examples::

    # the CPU run (~65 min on 2 cores): 3 domains, gain-ffn/gain/lora/ia3, lr sweep, all 8 domains scored
    python scripts/forgetting.py --preset cpu-small --sweep --out runs/forgetting-cpu

    # on a GPU: 8 domains, 512-token windows, 500 steps per stage
    python scripts/forgetting.py --preset paper --sweep --out runs/forgetting-paper

    # any order, any subset; flags override the preset
    python scripts/forgetting.py --domains math,legal --methods gain-ffn,lora --steps 10 --out /tmp/f

Rerunning with the same --out skips every finished (method, stage).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gainsurgery_lab import corpora as dom  # noqa: E402
from gainsurgery_lab import forgetting as fg  # noqa: E402
from gainsurgery.errors import GainSurgeryError  # noqa: E402


def _names(value, what: str) -> list[str]:
    if value in (None, ""):
        return []
    if isinstance(value, list):
        return value
    if value.strip().lower() == "all":
        return list(dom.DOMAINS if what == "domain" else fg.TRAINABLE_METHODS)
    return [v.strip() for v in value.split(",") if v.strip()]


def _domain(name: str, data_dir: Path | None) -> fg.Domain:
    return fg.Domain(name, str(dom.split_path(name, "train", data_dir)), str(dom.split_path(name, "validation", data_dir)))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output folder (resumable).")
@click.option("--base", default="embedded:gemma-3-270m", show_default=True, help="Base checkpoint.")
@click.option("--preset", type=click.Choice(sorted(fg.PRESETS)), default=None, help="cpu-small or paper.")
@click.option("--domains", "domain_list", default=None,
              help=f"Training sequence, comma-separated, in order (default: all eight: {','.join(dom.DOMAINS)}).")
@click.option("--eval-domains", default=None, help="Domains scored after every stage ('all'; default: --domains).")
@click.option("--methods", default=",".join(fg.TRAINABLE_METHODS), show_default=True,
              help=f"Comma-separated: {', '.join(fg.METHODS)} ('full' is not implemented).")
@click.option("--steps", type=int, default=None, help="Training steps per stage.")
@click.option("--seq-len", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--eval-windows", type=int, default=None, help="Validation windows per domain.")
@click.option("--lr-gain", type=float, default=None)
@click.option("--lr-gain-ffn", type=float, default=None)
@click.option("--lr-lora", type=float, default=None)
@click.option("--lr-ia3", type=float, default=None)
@click.option("--sweep/--no-sweep", default=False, help="Pick each method's lr by a short run on the first domain.")
@click.option("--sweep-steps", type=int, default=None)
@click.option("--yesno", type=int, default=None, help="Yes/no accuracy on the first N CoQA items, before and after.")
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Domain cache (default ~/.cache/gainsurgery/domains).")
@click.option("--estimate-only", is_flag=True, help="Print the time estimate and exit.")
@click.option("--progress/--no-progress", default=False, help="Per-step progress bars.")
def main(out, base, preset, domain_list, eval_domains, methods, steps, seq_len, batch_size, eval_windows, lr_gain,
         lr_gain_ffn, lr_lora, lr_ia3, sweep, sweep_steps, yesno, dtype, seed, data_dir, estimate_only, progress):
    """Adapt BASE to each domain in turn with each method; score every domain after every stage."""
    p = dict(fg.PRESETS.get(preset, {}))
    seq = _names(domain_list, "domain") or _names(p.get("domains", "all"), "domain")
    ev = _names(eval_domains, "domain") or _names(p.get("eval_domains"), "domain")
    lrs = {m: v for m, v in (("gain", lr_gain), ("gain-ffn", lr_gain_ffn), ("lora", lr_lora), ("ia3", lr_ia3))
           if v is not None}
    n_yesno = yesno if yesno is not None else p.get("yesno", 0)
    try:
        cfg = fg.ForgettingConfig(
            base=base, out=out, domains=[_domain(d, data_dir) for d in seq],
            eval_domains=[_domain(d, data_dir) for d in ev] or None,
            methods=_names(methods, "method"),
            steps=steps or p.get("steps", 20), seq_len=seq_len or p.get("seq_len", 128),
            batch_size=batch_size or p.get("batch_size", 4), eval_windows=eval_windows or p.get("eval_windows", 12),
            lrs=lrs, sweep=sweep, sweep_steps=sweep_steps or p.get("sweep_steps", 8), yesno=n_yesno,
            yesno_file=str(dom.default_yesno_out() / dom.YESNO_FILE) if n_yesno else None,
            dtype=dtype or p.get("dtype", "float32"), seed=seed, progress=progress)
        cfg.validate()
        est = fg.estimate_seconds(cfg)
        click.echo(f"estimate on a 2-core CPU (Gemma 3 270M, float32): {est['total'] / 60:.0f} min "
                   f"(sweep {est['sweep'] / 60:.0f}, sequence {est['sequence'] / 60:.0f}, "
                   f"yes/no {est['yesno'] / 60:.0f}, base row {est['base_row'] / 60:.1f}); "
                   "a GPU is far faster")
        if estimate_only:
            return
        if "full" in cfg.methods:
            click.echo("note: method 'full' (full fine-tuning) is not implemented; it will be skipped")
        results = fg.Experiment(cfg, echo=click.echo).run()
    except GainSurgeryError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo((Path(out) / "results.md").read_text(encoding="utf-8"))
    click.echo(f"plots: {', '.join(results['plots'])}")


if __name__ == "__main__":
    main()
