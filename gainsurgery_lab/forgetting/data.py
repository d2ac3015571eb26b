"""Domains of the forgetting experiment: where their text comes from and how it is split.

A domain is given as

- a built-in name (``legal``, ``code``, ... — the corpora of :mod:`gainsurgery.domains`,
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
- **train** documents: everything else.

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
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gainsurgery.errors import GainSurgeryError

DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
VALID_STEMS = ("validation", "valid", "val", "test", "dev")
MAX_WINDOWS_PER_UNIT = 2


class ForgettingError(GainSurgeryError):
    """The experiment was asked for something that cannot work."""


@dataclass(frozen=True)
class DomainSpec:
    """Where a domain's text comes from."""

    name: str
    train: Path
    valid: Path | None = None
    builtin: bool = False

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "train": self.train.name, "valid": self.valid.name if self.valid else None,
                "builtin": self.builtin}


def parse_domain(arg: str, data_dir: Path | None = None) -> DomainSpec:
    """Parse one ``--domain`` argument (see the module docstring)."""
    arg = arg.strip()
    name, sep, rest = arg.partition("=")
    name = name.strip()
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ForgettingError(f"--domain {arg!r}: the name must be letters, digits, '-', '_' or '.'")
    if not sep:
        return builtin_domain(name, data_dir)
    parts = [p.strip() for p in rest.split(",") if p.strip()]
    if not parts or len(parts) > 2:
        raise ForgettingError(f"--domain {arg!r}: expected NAME=TRAIN_FILE[,VALID_FILE] or NAME=FOLDER")
    first = Path(parts[0]).expanduser()
    if len(parts) == 1 and first.is_dir():
        return DomainSpec(name, *_files_in_folder(name, first))
    files = [Path(p).expanduser() for p in parts]
    for f in files:
        if not f.is_file():
            raise ForgettingError(f"--domain {name}: no such file: {f}")
        if f.suffix.lower() not in DATA_SUFFIXES:
            raise ForgettingError(f"--domain {name}: {f.name} is not .txt, .jsonl or .parquet")
    return DomainSpec(name, files[0], files[1] if len(files) == 2 else None)


def _files_in_folder(name: str, folder: Path) -> tuple[Path, Path | None]:
    def find(stems: Sequence[str]) -> Path | None:
        for stem in stems:
            for suffix in DATA_SUFFIXES:
                p = folder / f"{stem}{suffix}"
                if p.is_file():
                    return p
        return None

    train = find(["train"])
    if train is None:
        raise ForgettingError(f"--domain {name}: {folder} holds no train.txt/.jsonl/.parquet")
    return train, find(VALID_STEMS)


def builtin_domain(name: str, data_dir: Path | None = None) -> DomainSpec:
    """A built-in corpus (train + validation pooled; see the module docstring)."""
    from gainsurgery_lab import corpora

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


def _shuffled(n: int, key: str) -> list[int]:
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).permutation(n).tolist()


def take_windows(tokenizer: Any, docs: Sequence[str], order: Sequence[int], seq_len: int, count: int,
                 start_unit: int = 0) -> tuple[Windows, list[int]]:
    """Windows from documents in ``order`` until ``count``; returns them and the documents used.

    At most two windows per unit; a unit is one long document or a group of short
    ones packed EOS-joined into one window.
    """
    from gainsurgery.training.data import adds_bos

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


def prepare_domain(spec: DomainSpec, tokenizer: Any, seq_len: int, test_windows: int, dev_windows: int,
                   work: Path, min_train_windows: int) -> PreparedDomain:
    """Split ``spec`` (see the module docstring) and write its training documents to ``work``.

    Raises:
        ForgettingError: the domain is empty or too short for the windows asked.
    """
    from gainsurgery.training.data import DOC_SEPARATOR, pack, read_documents

    train_docs = read_documents(spec.train)
    valid_docs = read_documents(spec.valid) if spec.valid is not None else []
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
    rest = [i for i in order if i not in set(used_test)]
    dev, used_dev = take_windows(tokenizer, source, rest, seq_len, dev_windows, start_unit=max(test.units) + 1)
    if len(dev.ids) < dev_windows:
        raise ForgettingError(
            f"domain {spec.name}: after the {test_windows} test windows only {len(dev.ids)} dev windows fit "
            f"(need {dev_windows}); give more text or lower --dev-windows")
    held_out = set(used_test) | set(used_dev)
    remaining = train_docs if valid_docs else [d for i, d in enumerate(train_docs) if i not in held_out]
    if not remaining and min_train_windows:
        raise ForgettingError(f"domain {spec.name}: no training documents left after the test/dev split")
    work.mkdir(parents=True, exist_ok=True)
    train_file = work / "train.txt"
    text = DOC_SEPARATOR.join(remaining)
    train_file.write_text(text, encoding="utf-8")
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
    return PreparedDomain(spec.name, train_file, len(remaining), test, dev, info)


def save_windows(path: Path, dom: PreparedDomain) -> None:
    """Freeze a domain's windows (so every run and every resume scores the same tokens)."""
    obj = {"name": dom.name, "info": dom.info, "test": {"ids": dom.test.ids, "units": dom.test.units},
           "dev": {"ids": dom.dev.ids, "units": dom.dev.units}}
    from gainsurgery.io.outputs import write_file

    write_file(path, json.dumps(obj))


def load_windows(path: Path, train_file: Path) -> PreparedDomain:
    from gainsurgery.io import jsonsafe

    obj = jsonsafe.load(path, error=ForgettingError, max_bytes=1 << 30)
    return PreparedDomain(obj["name"], train_file, obj["info"]["documents_train"],
                          Windows(obj["test"]["ids"], obj["test"]["units"]),
                          Windows(obj["dev"]["ids"], obj["dev"]["units"]), obj["info"])
