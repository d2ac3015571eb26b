"""The experiment folder's records: every one read and written here, checked at this boundary.

An experiment folder (``--out``) is ours once it holds ``experiment.json``; it may
still have been edited, damaged or planted with links by anyone who can write to
it, and ``report`` is pointed at folders other people made. So every record is
read as hostile input, the way gainsurgery reads a checkpoint:

- through :func:`gainsurgery.io.inputs.open_input`: a regular file inside the
  folder, symlinks resolved (a link out of the folder, a FIFO, a device or anything
  under ``/proc`` is refused without blocking);
- within size and nesting limits (:mod:`gainsurgery.io.jsonsafe`; NaN refused);
- checked for shape and type against what the rest of the experiment says (the
  domains, the number of windows, the methods), failing with one line that names
  the file and the field.

Downstream code then trusts the returned dicts. Records are written with
:func:`gainsurgery.io.atomic.write_file` (whole or not at all, never through a
link), as strict JSON: a non-finite float becomes ``null``.

Layout::

    experiment.json             {"signature", "config", "sources"}   (the folder's marker)
    base.json                   {"test_nll": {domain: [per-window NLL]}, "dev_nll": {...}, "seconds"}
    base_yesno.json             yes/no record (see :func:`yesno_record`)
    base_probes.json            knowledge probes, dev and test items (see :func:`probes_record`)
    data/<domain>/windows.json  {"name", "info", "test": {"ids", "units"}, "dev": {...}}
    data/<domain>/train.txt     the training documents
    runs/<run>/run.json         {"method", "variant", "lr", "lr_exponent", "lr_label", "seed"}
    runs/<run>/stage-<k>.json   one stage (see :func:`stage_record`)
    runs/<run>/yesno.json
    runs/<run>/probes.json      knowledge probes, test items
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gainsurgery.io import jsonsafe
from gainsurgery.io.inputs import open_input, resolve_input, show_path
from gainsurgery_lab.forgetting.data import ForgettingError, PreparedDomain, Windows, check_domain_name
from gainsurgery_lab.forgetting.methods import MAX_EXPONENT, METHODS, MIN_EXPONENT
from gainsurgery.io.atomic import write_file

#: Size limit of one record, in bytes (a stage of 10,000 windows per domain is ~2 MB).
MAX_RECORD_BYTES = 64 << 20
#: Size limit of a domain's frozen windows, in bytes (token ids: ~7 bytes each).
MAX_WINDOWS_BYTES = 512 << 20
#: The largest token id a window may hold (vocabularies are far below this).
MAX_TOKEN_ID = 1 << 24
MAX_SEED = 1 << 20


def read(out: Path, rel: str, *, max_bytes: int = MAX_RECORD_BYTES) -> Any | None:
    """The parsed JSON of ``out/rel``, or None when it does not exist (checked as described above)."""
    if resolve_input(out, rel, missing_ok=True, error=ForgettingError) is None:
        return None
    with open_input(out, rel, error=ForgettingError) as f:
        return jsonsafe.load(f, where=show_path(out / rel), error=ForgettingError, max_bytes=max_bytes)


def _strict(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """Strict JSON text of ``obj`` (non-finite floats as null, paths as strings)."""
    return json.dumps(_strict(obj), allow_nan=False, **kw)


def write(path: Path, obj: Any, **kw: Any) -> None:
    """Write ``obj`` as strict JSON to ``path``, whole or not at all (unguessable temp: workers never share one)."""

    write_file(path, dumps(obj, **kw) + "\n", error=ForgettingError)


# ------------------------------------------------------------------------------------- shapes


def _fields(raw: Any, where: str) -> jsonsafe.Fields:
    return jsonsafe.Fields(raw, where=where, error=ForgettingError)


#: The largest NLL a window may have, in nats per predicted token: exp() of it must stay a float
#: (a uniform guess over a 262k vocabulary is 12.5).
MAX_NATS_PER_TOKEN = 700.0


def _numbers(value: Any, where: str, field: str, count: int | None, *, min_value: float | None = None,
             max_value: float | None = None) -> list[float]:
    if not isinstance(value, list):
        raise ForgettingError(f"{where}: {field}: expected an array of numbers, got {jsonsafe.type_name(value)}")
    if count is not None and len(value) != count:
        raise ForgettingError(f"{where}: {field}: {len(value)} values for {count} windows")
    out = []
    for x in value:
        v = jsonsafe.expect_number(x, where=where, field=field, error=ForgettingError)
        if min_value is not None and v < min_value:
            raise ForgettingError(f"{where}: {field}: value {v} is below {min_value}")
        if max_value is not None and v > max_value:
            raise ForgettingError(f"{where}: {field}: value {v} is above {max_value}")
        out.append(v)
    return out


def _bools(value: Any, where: str, field: str, count: int) -> list[bool]:
    if not isinstance(value, list) or len(value) != count or not all(isinstance(x, bool) for x in value):
        raise ForgettingError(f"{where}: {field}: expected {count} booleans")
    return value


@dataclass(frozen=True)
class Layout:
    """What the records of one experiment must agree with.

    Attributes:
        sequence: the training domains, in order.
        columns: every scored domain (the sequence, then the never-trained ones).
        test_windows / dev_windows: windows per domain, as frozen in ``windows.json``.
    """

    sequence: tuple[str, ...]
    columns: tuple[str, ...]
    test_windows: dict[str, int]
    dev_windows: dict[str, int]
    seq_len: int

    def nll_map(self, raw: Any, where: str, field: str, split: str, required: tuple[str, ...]
                ) -> dict[str, list[float]]:
        counts = self.test_windows if split == "test" else self.dev_windows
        obj = jsonsafe.expect_object(raw, where=where, field=field, error=ForgettingError)
        for d in obj:
            if d not in counts:
                raise ForgettingError(f"{where}: {field}: unknown domain {d!r} (domains: {', '.join(self.columns)})")
        for d in required:
            if d not in obj:
                raise ForgettingError(f"{where}: {field}: domain {d!r} missing")
        top = MAX_NATS_PER_TOKEN * (self.seq_len - 1)
        return {d: _numbers(v, where, f"{field}.{d}", counts[d], min_value=0.0, max_value=top)
                for d, v in obj.items()}


def experiment_record(raw: Any, where: str) -> dict[str, Any]:
    """``experiment.json``: the signature (what makes results comparable), the config, the sources."""
    f = _fields(raw, where)
    sig = f.obj("signature")
    for key in ("sequence", "extra_eval"):
        items = sig.raw(key)
        if not isinstance(items, list) or (key == "sequence" and not items):
            raise ForgettingError(f"{where}: signature.{key}: expected a{' non-empty' if key == 'sequence' else 'n'} "
                                  "array of domains")
        for i, d in enumerate(items):
            check_domain_name(_fields(d, where).str("name"), f"{where}: signature.{key}[{i}]")
    names = [d["name"] for d in sig.raw("sequence") + sig.raw("extra_eval")]
    if len(set(names)) != len(names):
        raise ForgettingError(f"{where}: a domain appears twice: {names}")
    sig.int("seq_len", min=2, max=1 << 20)
    cfg = f.obj("config")
    for key in ("steps", "batch_size", "test_windows", "dev_windows", "seq_len"):
        cfg.int(key, min=1)
    cfg.str("base")
    if "sources" in f:
        f.obj("sources")
    return raw


def windows_record(raw: Any, where: str, name: str, seq_len: int) -> dict[str, Any]:
    """``data/<name>/windows.json``: the frozen test/dev windows and the split's description."""
    f = _fields(raw, where)
    if f.str("name") != name:
        raise ForgettingError(f"{where}: name: {f.str('name')!r}, expected {name!r}")
    info = f.obj("info")
    for key in ("test_windows", "test_units", "dev_windows", "dev_units", "documents_train"):
        info.int(key, min=0)
    info.int("train_windows", 0, min=0)
    info.str("split")
    for split in ("test", "dev"):
        part = f.obj(split)
        ids, units = part.raw("ids"), part.raw("units")
        if not isinstance(ids, list) or not isinstance(units, list) or not ids or len(ids) != len(units):
            raise ForgettingError(f"{where}: {split}: expected non-empty arrays ids and units of equal length")
        for w in ids:
            if (not isinstance(w, list) or len(w) != seq_len
                    or not all(type(t) is int and 0 <= t < MAX_TOKEN_ID for t in w)):
                raise ForgettingError(f"{where}: {split}.ids: every window must be {seq_len} token ids")
        if not all(type(u) is int and u >= 0 for u in units):
            raise ForgettingError(f"{where}: {split}.units: expected non-negative integers")
        if info.int(f"{split}_windows") != len(ids):
            raise ForgettingError(f"{where}: info.{split}_windows says {info.int(f'{split}_windows')}, "
                                  f"{len(ids)} windows stored")
    return raw


def scores_record(raw: Any, where: str, layout: Layout) -> dict[str, Any]:
    """``base.json``: per-window NLLs of the base on every domain's test and dev windows."""
    f = _fields(raw, where)
    layout.nll_map(f.raw("test_nll"), where, "test_nll", "test", layout.columns)
    layout.nll_map(f.raw("dev_nll"), where, "dev_nll", "dev", layout.sequence)  # the lr choice reads them
    return {"test_nll": raw["test_nll"], "dev_nll": raw["dev_nll"], "seconds": f.number("seconds", None)}


def run_record(raw: Any, where: str, folder_name: str) -> dict[str, Any]:
    """``runs/<run>/run.json``: which method, variant, lr and seed the folder holds."""
    f = _fields(raw, where)
    method = f.str("method")
    if method not in METHODS:
        raise ForgettingError(f"{where}: method {method!r} is not one of {', '.join(METHODS)}")
    variant = f.str("variant")
    m = METHODS[method]
    if variant not in (m.default_variant, *m.variants):
        raise ForgettingError(f"{where}: variant {variant!r} is not one of {method}'s")
    e = f.int("lr_exponent", min=MIN_EXPONENT, max=MAX_EXPONENT)
    seed = f.int("seed", min=0, max=MAX_SEED)
    f.number("lr")
    expected = f"{method}__{variant}__lr{e}__s{seed}"
    if folder_name != expected:
        raise ForgettingError(f"{where}: describes run {expected}, but lies in runs/{folder_name}")
    return raw


def _stage_domain(f: jsonsafe.Fields, where: str, layout: Layout, k: int) -> str:
    """The domain of stage ``k`` (1-based), after checking that the record names that stage and that domain."""
    if f.int("stage") != k:
        raise ForgettingError(f"{where}: stage: {f.int('stage')}, expected {k}")
    own = layout.sequence[k - 1]
    if f.str("domain") != own:
        raise ForgettingError(f"{where}: domain: {f.str('domain')!r}, expected {own!r}")
    return own


def stage_record(raw: Any, where: str, layout: Layout, k: int) -> dict[str, Any]:
    """``runs/<run>/stage-<k>.json`` (``k`` 1-based): one finished (or failed) stage.

    Returns the checked fields only, optional ones present only when they hold a value,
    so readers can trust every key they find. A failed stage is ``{stage, domain, failed}``
    with ``failed`` a non-empty reason.
    """
    f = _fields(raw, where)
    own = _stage_domain(f, where, layout, k)
    rec: dict[str, Any] = {"stage": k, "domain": own}
    if "failed" in f:
        reason = f.str("failed", max_chars=4096)
        if not reason.strip():
            raise ForgettingError(f"{where}: failed: an empty reason")
        return {**rec, "failed": reason}
    rec["test_nll"] = layout.nll_map(f.raw("test_nll"), where, "test_nll", "test", (own,))
    rec["dev_nll"] = layout.nll_map(f.raw("dev_nll"), where, "dev_nll", "dev", (own,))
    train = f.obj("train")
    rec["train"] = {"trainable_parameters": train.int("trainable_parameters", min=0),
                    "final_loss": train.number("final_loss", None), "steps": train.int("steps", None, min=0),
                    "tokens": train.int("tokens", None, min=0), "seconds_per_step": train.number("seconds_per_step")}
    secs = f.obj("seconds")
    rec["seconds"] = {key: secs.number(key) for key in ("train", "merge", "eval", "stage")}
    for key in ("cpu_seconds", "peak_rss_mib", "stage_peak_rss_mib"):
        if f.raw(key, None) is not None:
            rec[key] = f.number(key)
    if f.raw("gains", None) is not None:
        g = f.obj("gains")
        rec["gains"] = {key: g.number(key) for key in ("max_abs_s_minus_1_stage", "max_abs_s_minus_1_effective")}
    if f.raw("peft", None) is not None:
        rec["peft"] = f.obj("peft").value
    return rec


def yesno_record(raw: Any, where: str) -> dict[str, Any]:
    """``base_yesno.json`` / ``runs/<run>/yesno.json``: per-item answers of one model."""
    f = _fields(raw, where)
    n = f.int("items", min=1)
    rec: dict[str, Any] = {"items": n}
    for key in ("said_yes", "correct", "answers_yes"):
        rec[key] = _bools(f.raw(key), where, key, n)
    # derived values are recomputed, never trusted
    rec["accuracy"] = sum(rec["correct"]) / n
    rec["yes_rate"] = sum(rec["said_yes"]) / n
    rec["seconds"] = f.number("seconds", 0.0)
    rec["cpu_seconds"] = f.number("cpu_seconds", 0.0)
    return rec


def alpha_stage_record(raw: Any, where: str, layout: Layout, k: int) -> dict[str, Any]:
    """``alpha/<run>/a<α>/stage-<k>.json``: the α-scaled model after stage ``k``, scored like a stage."""
    f = _fields(raw, where)
    own = _stage_domain(f, where, layout, k)
    alpha = f.number("alpha")
    if not 0 < alpha <= 16:
        raise ForgettingError(f"{where}: alpha: {alpha}, expected a number in (0, 16]")
    return {"stage": k, "domain": own, "alpha": alpha,
            "test_nll": layout.nll_map(f.raw("test_nll"), where, "test_nll", "test", (own,)),
            "dev_nll": layout.nll_map(f.raw("dev_nll"), where, "dev_nll", "dev", (own,)),
            "seconds": f.number("seconds", 0.0)}


def probes_record(raw: Any, where: str) -> dict[str, Any]:
    """``base_probes.json`` / ``runs/<run>/probes.json``: per-item answers of one model on the probe items."""
    f = _fields(raw, where)
    n = f.int("items", min=1)
    rec: dict[str, Any] = {"items": n}
    for key in ("ids", "probe", "split"):
        v = f.raw(key)
        if not isinstance(v, list) or len(v) != n or not all(isinstance(x, str) and 0 < len(x) <= 200 for x in v):
            raise ForgettingError(f"{where}: {key}: expected {n} short strings")
        rec[key] = v
    if not set(rec["split"]) <= {"dev", "test"}:
        raise ForgettingError(f"{where}: split: expected only 'dev' and 'test'")
    for key, lo in (("choices", 2), ("answer", 0), ("pred", 0)):
        v = f.raw(key)
        if not isinstance(v, list) or len(v) != n or not all(type(x) is int and lo <= x <= 64 for x in v):
            raise ForgettingError(f"{where}: {key}: expected {n} small non-negative integers")
        rec[key] = v
    if any(a >= c or p >= c for a, p, c in zip(rec["answer"], rec["pred"], rec["choices"])):
        raise ForgettingError(f"{where}: an answer or prediction beyond its item's choices")
    rec["correct"] = [a == p for a, p in zip(rec["answer"], rec["pred"])]  # derived, never trusted
    rec["seconds"] = f.number("seconds", 0.0)
    rec["cpu_seconds"] = f.number("cpu_seconds", 0.0)
    return rec


# ----------------------------------------------------------------------------- frozen domains


def save_domain(dom: PreparedDomain) -> None:
    """Freeze a prepared domain: its training text, then its windows (so every run and resume scores the same
    tokens). ``windows.json`` is written last: a domain counts as frozen only when both files are there."""

    if dom.train_text is None:
        raise ValueError(f"domain {dom.name}: already saved")
    dom.train_file.parent.mkdir(parents=True, exist_ok=True)
    write_file(dom.train_file, dom.train_text, error=ForgettingError)
    obj = {"name": dom.name, "info": dom.info, "test": {"ids": dom.test.ids, "units": dom.test.units},
           "dev": {"ids": dom.dev.ids, "units": dom.dev.units}}
    write(dom.train_file.parent / "windows.json", obj)
    dom.train_text = None


def frozen_windows(out: Path, name: str, seq_len: int) -> dict[str, Any] | None:
    """``data/<name>/windows.json`` checked, or None when there is none."""
    rel = f"data/{name}/windows.json"
    raw = read(out, rel, max_bytes=MAX_WINDOWS_BYTES)
    return None if raw is None else windows_record(raw, str(out / rel), name, seq_len)


def load_domain(out: Path, name: str, seq_len: int) -> PreparedDomain | None:
    """A domain frozen under ``out/data/<name>/`` (checked), or None when it is not frozen yet."""
    rel = f"data/{name}"
    if resolve_input(out, f"{rel}/train.txt", missing_ok=True, error=ForgettingError) is None:
        return None
    raw = read(out, f"{rel}/windows.json", max_bytes=MAX_WINDOWS_BYTES)
    if raw is None:
        return None
    obj = windows_record(raw, str(out / rel / "windows.json"), name, seq_len)
    return PreparedDomain(name, out / rel / "train.txt", obj["info"]["documents_train"],
                          Windows(obj["test"]["ids"], obj["test"]["units"]),
                          Windows(obj["dev"]["ids"], obj["dev"]["units"]), obj["info"])
