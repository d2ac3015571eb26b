"""Domains of the forgetting experiment: where their text comes from and how it is split.

A domain is given as

- a built-in name (``legal``, ``code``, ... — the corpora of :mod:`gainsurgery.corpora`,
  fetched once by ``scripts/fetch_domains.py``);
- ``NAME=TRAIN_FILE[,VALID_FILE]`` with .txt (documents separated by two blank
  lines), .jsonl or .parquet files (``text`` field/column);
- ``NAME=FOLDER`` where the folder holds ``train.*`` and optionally
  ``validation.*`` / ``valid.*`` / ``val.*`` / ``test.*``.

Each domain is split **by document** into three disjoint parts:

- **test** windows (reported): at least ``test_windows`` windows, at most two per
  document;
- **dev** windows (used only to choose learning rates): ``dev_windows`` windows
  from other documents, at most two per document;
- **train** documents: everything else, less any document that shares a 13-gram
  (:data:`NGRAM` words after :func:`ngram_words`' light normalisation) with a test or
  dev window: near-duplicates (license variants, generated modules) would otherwise
  teach the test text. Dev documents that share a 13-gram with a test window are
  skipped too, so the choice of lr is not made on the reported text either.

Test and dev come from the validation file when one is given (it must then hold
enough documents), otherwise they are carved from the training documents. The
built-in corpora pool their train and validation files (several have only a
handful of validation documents) and carve from the pool. The order in which
documents are taken is a seeded shuffle keyed by the domain name, so the split
is the same in every run.

A window is BOS (when the tokenizer adds one) + ``seq_len − 1`` tokens of one
document. Documents shorter than that are packed, EOS-joined, with the next ones
until a window is full; such a group is one bootstrap *unit* (see
:mod:`gainsurgery_lab.forgetting.stats`), as a long document is.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gainsurgery import corpora
from gainsurgery.errors import GainSurgeryError
from gainsurgery.io.inputs import resolve_input
from gainsurgery.training.data import DOC_SEPARATOR, adds_bos, pack, read_documents

DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
VALID_STEMS = ("validation", "valid", "val", "test", "dev")
MAX_WINDOWS_PER_UNIT = 2
#: Documents longer than this (characters) are cut into pieces at line boundaries, each a
#: document: tokenizing one 50 MB line at once takes gigabytes of memory.
MAX_DOC_CHARS = 1_000_000
#: Training documents sharing a run of this many normalised words with a held-out window are dropped
#: (13, as in the contamination checks of GPT-3 and later LM evaluations).
NGRAM = 13


class ForgettingError(GainSurgeryError):
    """The experiment was asked for something that cannot work."""


#: A domain name: it names a folder under ``data/``, so a plain name, never "." or "..".
DOMAIN_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}", re.ASCII)


def check_domain_name(name: Any, where: str) -> str:
    """``name`` if it is a valid domain name (1-64 of letters, digits, ``-_.``; not starting with ``.``/``-``)."""
    if not isinstance(name, str) or not DOMAIN_NAME_RE.fullmatch(name):
        raise ForgettingError(f"{where}: domain name {name!r} must be 1-64 letters, digits, '-', '_' or '.', "
                              "not starting with '.' or '-'")
    return name


@dataclass(frozen=True)
class DomainSpec:
    """Where a domain's text comes from."""

    name: str
    train: Path
    valid: Path | None = None
    builtin: bool = False
    text_field: str = "text"  # .jsonl field / .parquet column holding the text

    def describe(self) -> dict[str, Any]:
        d = {"name": self.name, "train": self.train.name, "valid": self.valid.name if self.valid else None,
             "builtin": self.builtin}
        if self.text_field != "text":  # only when set: folders made before the option stay comparable
            d["text_field"] = self.text_field
        return d

    def files(self) -> list[Path]:
        return [p for p in (self.train, self.valid) if p is not None]


def parse_domain(arg: str, data_dir: Path | None = None, text_field: str = "text") -> DomainSpec:
    """Parse one ``--domain`` argument (see the module docstring).

    A file named in the argument may be a symlink (the user chose it); a file found in a
    named folder must resolve inside that folder, like every input folder's files.
    """
    arg = arg.strip()
    name, sep, rest = arg.partition("=")
    name = check_domain_name(name.strip(), f"--domain {arg!r}")
    if not sep:
        return builtin_domain(name, data_dir)
    parts = [p.strip() for p in rest.split(",") if p.strip()]
    if not parts or len(parts) > 2:
        raise ForgettingError(f"--domain {arg!r}: expected NAME=TRAIN_FILE[,VALID_FILE] or NAME=FOLDER")
    first = Path(parts[0]).expanduser()
    if len(parts) == 1 and first.is_dir():
        spec = DomainSpec(name, *_files_in_folder(name, first), text_field=text_field)
    else:
        files = [Path(p).expanduser() for p in parts]
        for f in files:
            if not f.exists():
                raise ForgettingError(f"--domain {name}: no such file: {f}")
            if not f.is_file():
                raise ForgettingError(f"--domain {name}: {f} is not a regular file")
            if f.suffix.lower() not in DATA_SUFFIXES:
                raise ForgettingError(f"--domain {name}: {f.name} is not .txt, .jsonl, .json or .parquet")
        spec = DomainSpec(name, files[0], files[1] if len(files) == 2 else None, text_field=text_field)
    if spec.valid is not None and spec.valid.resolve() == spec.train.resolve():
        raise ForgettingError(f"--domain {name}: the training and validation files are the same file: the test "
                              "windows would be trained on; give a separate validation file, or only the "
                              "training file (test and dev windows are then carved from its documents)")
    return spec


def _files_in_folder(name: str, folder: Path) -> tuple[Path, Path | None]:

    def find(stems: Sequence[str]) -> Path | None:
        for stem in stems:
            for suffix in DATA_SUFFIXES:
                # a link out of the folder, a FIFO or a folder under the name: one line, never followed
                if resolve_input(folder, f"{stem}{suffix}", missing_ok=True, error=ForgettingError) is not None:
                    return folder / f"{stem}{suffix}"
        return None

    train = find(["train"])
    if train is None:
        raise ForgettingError(f"--domain {name}: {folder} holds no train.txt/.jsonl/.parquet")
    return train, find(VALID_STEMS)


def builtin_domain(name: str, data_dir: Path | None = None) -> DomainSpec:
    """A built-in corpus (train + validation pooled; see the module docstring)."""

    if name not in corpora.DOMAINS:
        raise ForgettingError(f"unknown built-in domain {name!r}; built-ins: {', '.join(corpora.DOMAINS)} "
                              "(or give your own: --domain NAME=TRAIN_FILE[,VALID_FILE])")
    train = corpora.split_path(name, "train", data_dir)
    valid = corpora.split_path(name, "validation", data_dir)
    if not train.is_file():
        raise ForgettingError(f"built-in domain {name!r} is not fetched yet: run "
                              f"python scripts/fetch_domains.py --domains {name}")
    return DomainSpec(name, train, valid if valid.is_file() else None, builtin=True)


@dataclass
class Windows:
    """Evaluation windows of one domain split (test or dev)."""

    ids: list[list[int]]
    units: list[int]

    @property
    def tokens(self) -> list[int]:
        """Predicted tokens per window (all windows are full: seq_len − 1)."""
        return [len(w) - 1 for w in self.ids]


@dataclass
class PreparedDomain:
    """A domain split into train documents (written to a file) and test/dev windows."""

    name: str
    train_file: Path
    train_documents: int
    test: Windows
    dev: Windows
    info: dict[str, Any] = field(default_factory=dict)
    #: the training documents, joined, until :func:`save_domain` writes them to ``train_file``
    train_text: str | None = None


def _shuffled(n: int, key: str) -> list[int]:
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).permutation(n).tolist()


def take_windows(tokenizer: Any, docs: Sequence[str], order: Sequence[int], seq_len: int, count: int,
                 start_unit: int = 0) -> tuple[Windows, list[int]]:
    """Windows from documents in ``order`` until ``count``; returns them and the documents used.

    At most two windows per unit; a unit is one long document or a group of short
    ones packed EOS-joined into one window.
    """

    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    eos = tokenizer.eos_token_id
    body = seq_len - (1 if bos is not None else 0)
    head = [bos] if bos is not None else []
    ids: list[list[int]] = []
    units: list[int] = []
    used: list[int] = []
    unit = start_unit
    pack: list[int] = []
    pack_docs: list[int] = []
    for i in order:
        if len(ids) >= count:
            break
        toks = tokenizer(docs[i], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if len(toks) >= body:
            n = min(MAX_WINDOWS_PER_UNIT, len(toks) // body, count - len(ids))
            for j in range(n):
                ids.append(head + toks[j * body:(j + 1) * body])
                units.append(unit)
            used.append(i)
            unit += 1
            continue
        pack.extend(toks)
        pack_docs.append(i)
        if len(pack) >= body:
            ids.append(head + pack[:body])
            units.append(unit)
            used.extend(pack_docs)
            unit += 1
            pack, pack_docs = [], []
    return Windows(ids, units), used


def ngram_words(text: str) -> list[str]:
    """Light normalisation for overlap checks: lower case, runs of letters and digits as words.

    Punctuation, whitespace and line breaks are ignored, so a re-wrapped or re-indented
    copy of a passage still matches.
    """
    return re.findall(r"[^\W_]+", text.lower())


def ngrams(text: str, n: int = NGRAM) -> set[int]:
    """Hashes of every run of ``n`` normalised words of ``text`` (empty when it is shorter).

    Hashes stay within one process (Python salts ``hash`` per process): they are only
    ever compared with others made in the same call.
    """
    words = ngram_words(text)
    return {hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)}


def window_ngrams(tokenizer: Any, windows: "Windows", n: int = NGRAM) -> set[int]:
    """The n-grams of the text that ``windows`` hold (decoded, special tokens left out)."""
    out: set[int] = set()
    for ids in windows.ids:
        out |= ngrams(tokenizer.decode(ids, skip_special_tokens=True), n)
    return out


def _cut_long(docs: list[str], limit: int = MAX_DOC_CHARS) -> list[str]:
    """Documents longer than ``limit`` characters cut into pieces at line boundaries (hard cut if none)."""
    out: list[str] = []
    for d in docs:
        while len(d) > limit:
            cut = d.rfind("\n", 0, limit)
            cut = cut if cut > 0 else limit
            piece, d = d[:cut].strip(), d[cut:].strip()
            if piece:
                out.append(piece)
        if d:
            out.append(d)
    return out


def prepare_domain(spec: DomainSpec, tokenizer: Any, seq_len: int, test_windows: int, dev_windows: int,
                   work: Path, min_train_windows: int) -> PreparedDomain:
    """Split ``spec`` (see the module docstring), in memory; :func:`save_domain` writes it to ``work``.

    Held-out documents never reach training: a training document whose text equals a
    test or dev document (a file given twice, a corpus with duplicates), or that shares
    any :data:`NGRAM`-gram with a test or dev window, is dropped; a candidate dev document
    that shares one with a test window is skipped. ``info`` counts both.

    Raises:
        ForgettingError: the domain is empty or too short for the windows asked.
    """

    try:
        train_docs = _cut_long(read_documents(spec.train, spec.text_field))
        valid_docs = _cut_long(read_documents(spec.valid, spec.text_field)) if spec.valid is not None else []
    except GainSurgeryError as exc:  # the core's message, for this command's option
        raise ForgettingError(f"domain {spec.name}: {exc}".replace("use --text-field", "see --text-field")) from None
    if spec.builtin:  # pool: several built-in validation files hold only a handful of documents
        train_docs, valid_docs = train_docs + valid_docs, []
    source = valid_docs if valid_docs else train_docs
    order = _shuffled(len(source), f"gainsurgery-forgetting:{spec.name}")
    test, used_test = take_windows(tokenizer, source, order, seq_len, test_windows)
    if len(test.ids) < test_windows:
        raise ForgettingError(
            f"domain {spec.name}: only {len(test.ids)} test windows of {seq_len} tokens fit in "
            f"{'its validation file' if valid_docs else 'its documents'} (need {test_windows}, at most "
            f"{MAX_WINDOWS_PER_UNIT} per document); give more text or lower --test-windows/--seq-len")
    test_grams = window_ngrams(tokenizer, test)
    taken = set(used_test)
    rest = [i for i in order if i not in taken]
    # a dev document that repeats test text would choose lrs on the reported windows
    clean_rest = [i for i in rest if not (ngrams(source[i]) & test_grams)]
    dev_skipped = len(rest) - len(clean_rest)
    dev, used_dev = take_windows(tokenizer, source, clean_rest, seq_len, dev_windows,
                                 start_unit=max(test.units) + 1)
    if len(dev.ids) < dev_windows:
        raise ForgettingError(
            f"domain {spec.name}: after the {test_windows} test windows only {len(dev.ids)} dev windows fit "
            f"(need {dev_windows})" + (f"; {dev_skipped} documents were passed over because they share a "
                                       f"{NGRAM}-word run with a test window" if dev_skipped else "")
            + "; give more text or lower --dev-windows")
    held_out = set(used_test) | set(used_dev)
    held_text = {source[i] for i in held_out}
    held_grams = test_grams | window_ngrams(tokenizer, dev)
    candidates = [d for i, d in enumerate(train_docs) if (valid_docs or i not in held_out)]
    unique = [d for d in candidates if d not in held_text]
    remaining = [d for d in unique if not (ngrams(d) & held_grams)]
    dropped = len(candidates) - len(unique)
    overlapping = len(unique) - len(remaining)
    if not remaining and min_train_windows:
        raise ForgettingError(f"domain {spec.name}: no training documents left after the test/dev split (every "
                              f"one repeats held-out text or shares a {NGRAM}-word run with a test or dev window)")
    train_file = work / "train.txt"
    text = DOC_SEPARATOR.join(remaining)
    try:
        n_train = len(pack(tokenizer, remaining, seq_len).ids)
    except GainSurgeryError:
        n_train = 0
    if n_train < min_train_windows:
        raise ForgettingError(f"domain {spec.name}: its training text gives {n_train} windows of {seq_len} "
                              f"tokens; need at least {min_train_windows} (one batch)")
    info = {**spec.describe(), "documents_train": len(remaining), "train_windows": n_train,
            "test_windows": len(test.ids), "test_units": len(set(test.units)),
            "dev_windows": len(dev.ids), "dev_units": len(set(dev.units)),
            "split": "validation file" if valid_docs else ("pooled train+validation" if spec.builtin
                                                         else "carved from the training file"),
            "train_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]}
    if dropped:
        info["duplicates_dropped"] = dropped
    info["ngram_dropped"] = overlapping
    info["ngram_dropped_chars"] = sum(len(d) for d in unique) - sum(len(d) for d in remaining)
    info["dev_skipped"] = dev_skipped
    return PreparedDomain(spec.name, train_file, len(remaining), test, dev, info, train_text=text)
