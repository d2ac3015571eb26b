#!/usr/bin/env python
"""The forgetting–adaptation front: sequential adaptation, GAIN vs LoRA (and more), fair across lrs.

Thin command line over :mod:`gainsurgery_lab.forgetting` (see its modules and
docs/results/forgetting.md). Examples::

    # the CPU run of docs/results (about 4 hours on 2 cores; resumable: rerun the same line)
    python scripts/forgetting.py run --preset cpu --out runs/front-cpu

    # your own domains, in this order; two methods; quick
    python scripts/forgetting.py run --out runs/mine --domain a=a_train.jsonl,a_valid.jsonl \\
        --domain b=corpus_b/ --methods gain-ffn,lora --steps 20 --seeds 1 --yesno 0

    # tables, front plot and heatmaps from whatever has finished so far
    python scripts/forgetting.py report --out runs/front-cpu
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gainsurgery.errors import GainSurgeryError  # noqa: E402
from gainsurgery_lab.forgetting import presets  # noqa: E402

#: Exit status of ``run`` when --stop-after cut the schedule short (0: complete, 1: an error).
EXIT_MORE_TO_DO = 3


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _alphas(text: str) -> list[float]:
    from gainsurgery_lab.forgetting.alpha import parse_alphas

    return parse_alphas(text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Sequential adaptation over several domains: how much does each method forget, at matched gain?"""


@main.command()
@click.option("--out", required=True, help="Experiment folder: new, empty, or one of ours to resume.")
@click.option("--preset", type=click.Choice(sorted(presets.PRESETS)), default=None,
              help="A ready configuration (flags below override it).")
@click.option("--base", default=None, help="Base checkpoint [default: embedded:gemma-3-270m].")
@click.option("--domain", "domains", multiple=True, metavar="NAME[=TRAIN[,VALID]|=FOLDER]",
              help="A training domain, in sequence order (repeat). A bare NAME is a built-in corpus.")
@click.option("--eval-domain", "eval_domains", multiple=True, metavar="NAME[=...]",
              help="An extra domain scored after every stage but never trained on (repeat).")
@click.option("--methods", default=None, help="Methods whose lr front is run first (comma-separated).")
@click.option("--seed-methods", default=None, help="Methods that get extra seeds at their dev-optimal lr.")
@click.option("--extra-methods", default=None, help="Methods run after the main comparison, if time allows.")
@click.option("--variants", default=None, help="Staging variants at the dev-optimal lr, e.g. gain-ffn:continue.")
@click.option("--grid", "grids", multiple=True, metavar="METHOD=E1,E2,...",
              help="Override a method's lr grid: half-decade exponents (lr = 10^(E/2)).")
@click.option("--seeds", type=int, default=None,
              help="Seeds at the chosen lr, in all (a seed changes the data order; LoRA's initialisation too).")
@click.option("--select-seeds", type=int, default=None,
              help="Seeds at every lr of a front; the lr is chosen on their mean dev score (tie rule: the "
                   "smallest lr within one seed sd of the best).")
@click.option("--steps", type=int, default=None, help="Training steps per stage.")
@click.option("--batch-size", type=int, default=None)
@click.option("--seq-len", type=int, default=None)
@click.option("--test-windows", type=int, default=None, help="Reported windows per domain (<= 2 per document).")
@click.option("--dev-windows", type=int, default=None, help="Selection windows per domain (other documents).")
@click.option("--yesno", type=int, default=None, help="Yes/no items (CoQA) for the chosen runs; 0 to skip.")
@click.option("--probes/--no-probes", "use_probes", default=None,
              help="Knowledge probes (python scripts/fetch_domains.py --probes) for the base and the chosen runs.")
@click.option("--phases", default=None, help="Subset of fronts,seeds,yesno,probes,extras,alpha (or none).")
@click.option("--alphas", default=None, metavar="A1,A2,...",
              help="The α-front (phase alpha): the chosen run of each seed method scored at s^α (gains) or "
                   "base + α·delta (adapters), no training; e.g. 0.25,0.5,0.75,1.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Built-in corpora cache (default ~/.cache/gainsurgery/domains).")
@click.option("--text-field", default="text", show_default=True,
              help="The .jsonl field / .parquet column that holds the text, for every --domain file.")
@click.option("--worker", default=None, metavar="I/N",
              help="Run only the I-th of N shares of the initial lr grids (parallel processes on one GPU); "
                   "score the base first with --phases none, finish with a plain run.")
@click.option("--max-extensions", type=int, default=None, help="Lrs added beyond a grid to reach an interior optimum.")
@click.option("--stop-after", type=click.FloatRange(min=0), default=None, metavar="MINUTES",
              help="Start no new run after this many minutes (finished runs are kept; rerun to continue).")
@click.option("--dry-run", is_flag=True, help="Validate the domains and print the plan; train nothing.")
@click.option("--progress/--no-progress", default=False, help="Per-step progress bars.")
def run(out, preset, base, domains, eval_domains, methods, seed_methods, extra_methods, variants, grids, seeds,
        select_seeds, use_probes, alphas, steps, batch_size, seq_len, test_windows, dev_windows, yesno, phases, data_dir, text_field, worker,
        max_extensions, stop_after, dry_run, progress):
    """Run (or resume) the experiment into OUT."""
    from gainsurgery_lab.forgetting.runner import Experiment

    try:
        if stop_after is not None and not math.isfinite(stop_after):
            raise presets.ForgettingError(f"--stop-after {stop_after}: give a finite number of minutes")
        cfg = presets.make_config(
            out=out, preset=preset, base=base, domains=list(domains), eval_domains=list(eval_domains),
            text_field=text_field,
            front_methods=_csv(methods), seed_methods=_csv(seed_methods), extra_methods=_csv(extra_methods),
            variants=_csv(variants), grids=presets.parse_grids(grids), seeds=seeds,
            select_seeds=select_seeds, probes=use_probes, steps=steps,
            alphas=None if alphas is None else _alphas(alphas),
            batch_size=batch_size, seq_len=seq_len, test_windows=test_windows, dev_windows=dev_windows,
            yesno=yesno, phases=[] if phases == "none" else _csv(phases), data_dir=data_dir, progress=progress,
            max_extensions=max_extensions,
            deadline=None if stop_after is None else time.time() + 60 * stop_after)
        share = presets.parse_worker(worker)
        exp = Experiment(cfg, echo=click.echo)
        if dry_run:
            exp.prepare(write=False)  # every domain split and checked; nothing written
            click.echo(presets.describe_plan(cfg))
            return
        complete = exp.execute(worker=share)
    except GainSurgeryError as exc:
        click.echo("error: " + " ".join(str(exc).split()), err=True)
        sys.exit(1)
    if not complete:  # a driver running pieces of --stop-after minutes tells "more to do" from "done"
        click.echo(f"stopped at --stop-after; rerun the same command to continue (tables so far: "
                   f"python scripts/forgetting.py report --out {out})")
        sys.exit(EXIT_MORE_TO_DO)
    click.echo(f"done; tables and plots: python scripts/forgetting.py report --out {out}")


@main.command()
@click.option("--out", required=True, help="Experiment folder.")
def report(out):
    """Write results.json, results.md and the plots from what has finished so far."""
    from gainsurgery_lab.forgetting.report import write_report

    try:
        paths = write_report(Path(out))
    except GainSurgeryError as exc:
        click.echo("error: " + " ".join(str(exc).split()), err=True)
        sys.exit(1)
    click.echo("report: " + ", ".join(str(p) for p in paths))


@main.command()
@click.option("--out", required=True, help="Experiment folder.")
@click.argument("run_a")
@click.argument("run_b")
def compare(out, run_a, run_b):
    """Two finished runs side by side, with paired bootstrap intervals of A - B.

    RUN_A and RUN_B are run folder names under OUT/runs (e.g. gain-ffn__stack__lr-5__s0):
    any two, also off the chosen lrs, e.g. to compare at nearly equal in-domain change.
    """
    from gainsurgery_lab.forgetting.report import compare_runs

    try:
        click.echo(compare_runs(Path(out), run_a, run_b))
    except GainSurgeryError as exc:
        click.echo("error: " + " ".join(str(exc).split()), err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
