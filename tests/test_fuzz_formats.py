"""Fuzzing the file formats: JSON, safetensors headers, gain files, checkpoints, provenance, claims.

Every parser here reads bytes someone else wrote. Any input must give a result or a
one-line GainSurgeryError (see tests/fuzzing.py for the guards and strategies), and
what a parser accepts must hold the invariants the rest of the code trusts (tensors
tiling the data buffer, gains that are finite and non-zero). Inputs are mutations of
valid documents, so the fuzzer gets past the first check and into the code behind it:
a gain file that loads is stacked, inverted, summarized, carded and applied; a
checkpoint that opens is targeted and applied to; a provenance record that parses is
turned into a model card.

CI runs a bounded number of examples; ``GAINSURGERY_FUZZ_EXAMPLES=N`` runs N per test.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fuzzing import (
    BASE_TENSORS,
    CONFIG,
    DOWN,
    O_PROJ,
    SHARDS,
    Dup,
    Raw,
    corrupted,
    failed,
    fuzz_settings,
    header_for,
    index_doc,
    json_text,
    make_base,
    mutated,
    outcome,
    render,
    safetensors_bytes,
    safetensors_file,
    shard_parts,
    write,
)
from gainsurgery import api
from gainsurgery import gainfile as gf
from gainsurgery.errors import CheckpointError, GainFileError
from gainsurgery.hub.cards import gain_model_card
from gainsurgery.io import jsonsafe
from gainsurgery.io.checkpoint import fingerprint, open_checkpoint, quantization_note
from gainsurgery.io.claims import clean_leftovers
from gainsurgery.io.safetensors import DTYPE_BITS, parse_header
from gainsurgery.merge.plan import make_plan


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The synthetic two-shard llama-shaped checkpoint (tests/fuzzing.py), unmutated."""
    return make_base(tmp_path_factory.mktemp("fuzz-base") / "base")


@pytest.fixture
def scratch():
    """A fresh folder per example (hypothesis runs many examples in one test call)."""
    made: list[Path] = []

    def fresh() -> Path:
        made.append(Path(tempfile.mkdtemp(prefix="gainsurgery-fuzz-")))
        return made[-1]

    yield fresh
    for p in made:
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- JSON


JSON_SEED = {"a": [1, 2.5, "x", None, True], "b": {"c": {"d": []}}, "e": "text"}


@fuzz_settings(100)
@given(data=json_text(JSON_SEED, max_mutations=4), unique=st.booleans(), depth=st.integers(1, 256),
       limit=st.sampled_from([64, 4096, 1 << 20]))
@example(data=b'{"a": 1e999}', unique=False, depth=64, limit=1 << 20)
@example(data=b"[" * 200_000, unique=True, depth=256, limit=1 << 20)
@example(data=b"1" * 5000, unique=False, depth=64, limit=1 << 20)
# Regression: a lone surrogate escape parsed into a str no file, card or upload could encode (found through
# gainsurgery.json: push --dry-run crashed writing the card).
@example(data=b'{"name": "\\ud800"}', unique=False, depth=64, limit=1 << 20)
@example(data=b'{"\\udfff": 1}', unique=True, depth=64, limit=1 << 20)
def test_json_loads_gives_a_value_or_one_line(data, unique, depth, limit):
    got = outcome(jsonsafe.loads, data, where="doc.json", max_bytes=limit, max_depth=depth, unique_keys=unique)
    if not failed(got):
        # What parsed is plain JSON again: strict, finite, Unicode, within the depth asked.
        text = json.dumps(got, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")
        assert jsonsafe.nesting_depth(text, depth) <= depth


def test_reading_a_small_json_file_costs_what_it_holds_not_its_limit(tmp_path):
    """Regression (fuzz, through the experiment's windows.json, read with a 512 MiB limit): the reader
    allocated the whole limit up front, a MemoryError under a 512 MiB budget for a 1-byte file."""
    from fuzzing import bounded

    path = tmp_path / "windows.json"
    path.write_bytes(b'{"a": 1}')
    with bounded(memory_bytes=128 << 20):
        assert jsonsafe.load(path, max_bytes=1 << 30) == {"a": 1}


@fuzz_settings(60)
@given(lines=st.lists(json_text({"text": "a document", "n": 1}, max_mutations=2), max_size=6),
       sep=st.sampled_from([b"\n", b"\r\n", b"\n\n"]), max_line=st.sampled_from([16, 1 << 20]))
def test_jsonl_gives_rows_or_one_line(lines, sep, max_line):
    stream = io.BytesIO(sep.join(lines))
    got = outcome(lambda: list(jsonsafe.iter_jsonl(stream, where="data.jsonl", max_line_bytes=max_line,
                                                   max_lines=5)))
    if not failed(got):
        assert len(got) <= 5


# --------------------------------------------------------------------------- safetensors headers


DTYPES = sorted(DTYPE_BITS)


@st.composite
def valid_tensors(draw):
    """1-4 tensors of any dtype and a small shape, with their bytes."""
    out = []
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        bits = int(np.prod(shape)) * DTYPE_BITS[dtype]
        if bits % 8:
            shape = shape + [2] if bits * 2 % 8 == 0 else shape + [8]
            bits = int(np.prod(shape)) * DTYPE_BITS[dtype]
        name = draw(st.sampled_from([f"t{i}", f"model.layers.{i}.w", "\u2028", "a" * 300])) + str(i)
        out.append((name, dtype, shape, bytes(bits // 8)))
    return out


@st.composite
def header_files(draw):
    tensors = draw(valid_tensors())
    meta = draw(st.sampled_from([None, {"format": "pt"}, {}]))
    header, data = header_for(tensors, meta)
    return draw(safetensors_file(header, data, keys=["__metadata__", "dtype", "shape", "data_offsets"]))


@fuzz_settings(200)
@given(raw=header_files())
@example(raw=struct.pack("<Q", 2**64 - 1) + b"{}")
@example(raw=struct.pack("<Q", 2) + b"{}")
@example(raw=struct.pack("<Q", 80) + b'{"a":{"dtype":"F32","shape":[0,18446744073709551616],"data_offsets":[0,0]}}'
         + b" " * 2)
# Regressions: a metadata key that is a control character, or 5,000 characters long, was
# printed raw in "__metadata__.KEY: expected string" (two lines; an unbounded line).
@example(raw=safetensors_bytes({"__metadata__": {"\x00": None}}, b""))
@example(raw=safetensors_bytes({"__metadata__": {"k" * 5000: 1}}, b""))
@example(raw=safetensors_bytes({"x" * 5000: {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)))
def test_safetensors_header_gives_tiling_tensors_or_one_line(raw):
    got = outcome(parse_header, io.BytesIO(raw), len(raw), "x.safetensors")
    if failed(got):
        assert isinstance(got, CheckpointError)
        return
    data_start, tensors, metadata = got
    # What the format promises the rest of the code: the tensors tile [data_start, end of file).
    at = data_start
    for info in tensors.values():
        assert info.start == at and info.end >= info.start
        assert info.nbytes * 8 == int(np.prod(info.shape, dtype=object)) * DTYPE_BITS[info.dtype]
        at = info.end
    assert at == len(raw)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())


# --------------------------------------------------------------------------- gain files


GAIN_KEYS = [O_PROJ.format(0), DOWN.format(1)]
GAIN_LENGTHS = {O_PROJ.format(0): 4, DOWN.format(1): 6}
SHA = "sha256:" + "ab" * 32
PARENTS_SEED = [{"name": "a.safetensors", "method": "gain", "side": "in", "parameters": 10,
                 "base_tensors_sha256": SHA, "tensors": [GAIN_KEYS[0]]},
                {"name": "b.safetensors", "parents": [{"name": "c"}]}]
TRAINING_SEED = {"steps": 10, "lr": 0.01, "data": ["legal.txt"], "seed": 0}
META_KEYS = ["format", "dims", "method", "side", "base_model", "base_fingerprint", "base_tensors_sha256",
             "description", "parents", "training"]

gain_values = st.one_of(
    st.floats(0.5, 2.0, width=32),
    st.sampled_from([0.0, -0.0, -1.0, float("nan"), float("inf"), 1e-38, 3e38, 1e-45]),
    st.floats(width=32))


GAIN_PARTS = ["none", "values", "dims", "parents", "training", "metadata", "header", "bytes", "all"]


@st.composite
def gain_files(draw):
    """The bytes of a gain file: a valid one with one part mutated (values, a metadata JSON, the header...).

    Mutating one part at a time keeps most of the file valid, so the parser gets past
    its first checks to the part that was changed (and to the commands behind it).
    """
    part = draw(st.sampled_from(GAIN_PARTS))
    every = part == "all"
    vectors = []
    for key in GAIN_KEYS:
        n = GAIN_LENGTHS[key]
        values = draw(st.lists(gain_values, min_size=n, max_size=n)) if part == "values" or every \
            else [1.0 + 0.01 * i for i in range(n)]
        vectors.append((key, "F32", [n], np.array(values, dtype="<f4").tobytes()))
    seeds = {"dims": {k: 1 for k in GAIN_KEYS}, "parents": PARENTS_SEED, "training": TRAINING_SEED}
    keys = {"dims": GAIN_KEYS, "parents": ["name", "tensors", "base_tensors_sha256"], "training": None}
    docs = {name: draw(mutated(seed, 3, keys=keys[name])) if part == name or every else seed
            for name, seed in seeds.items()}
    meta: dict = {"format": gf.FORMAT, "method": "gain-ffn", "side": "in", "base_model": "org/base",
                  "base_tensors_sha256": SHA, "description": "a *test* <gain>",
                  **{name: render(doc) for name, doc in docs.items()}}
    if part == "metadata" or every:
        meta = draw(mutated(meta, 3, keys=META_KEYS))
    header, data = header_for(vectors, meta if isinstance(meta, dict) else None)
    if not isinstance(meta, dict):
        header = {**header, "__metadata__": meta}
    if part == "header" or every:
        return draw(safetensors_file(header, data, max_mutations=3, keys=META_KEYS))
    raw = safetensors_bytes(header, data)
    return draw(corrupted(raw)) if part == "bytes" else raw


@fuzz_settings(100)
@given(raw=gain_files(), negative=st.booleans())
# Regression: a dim that is a 5,000-character string was quoted whole in the error.
@example(raw=safetensors_bytes(*header_for(
    [(GAIN_KEYS[0], "F32", [4], np.ones(4, "<f4").tobytes())],
    {"format": gf.FORMAT, "dims": json.dumps({GAIN_KEYS[0]: "x" * 5000})})), negative=False)
# A key of 5,000 characters that is no tensor of the base: the plan's error names it by its ends.
@example(raw=safetensors_bytes(*header_for(
    [("k" * 5000, "F32", [4], np.ones(4, "<f4").tobytes())],
    {"format": gf.FORMAT, "dims": json.dumps({"k" * 5000: 1})})), negative=False)
def test_gain_file_loads_or_one_line_and_every_command_takes_what_loads(raw, negative, base, scratch):
    work = scratch()
    path = work / "g.safetensors"
    write(path, raw)
    gain = outcome(gf.load, path, allow_negative=negative)
    if failed(gain):
        assert isinstance(gain, GainFileError), gain
        return
    # What loads holds what the format promises...
    assert gain.vectors and set(gain.vectors) == set(gain.dims)
    for key, vec in gain.vectors.items():
        assert vec.dtype == np.float32 and vec.ndim == 1 and vec.size > 0
        assert np.all(np.isfinite(vec)) and np.all(vec != 0)
        assert negative or np.all(vec > 0)
        assert type(gain.dims[key]) is int and gain.dims[key] >= 0
    # ...and every command that takes a gain file takes it: one line at worst.
    for step in (lambda: gf.stats(gain), lambda: gf.invert(gain), lambda: gf.stack([gain, gain], ["a", "b"]),
                 lambda: gf.base_checks(gain, "g"), lambda: gf.describe(gain, "g", path),
                 lambda: gain_model_card(gain, "g.safetensors", "me/gain"),
                 lambda: api.push(path, "me/gain", dry_run=True)):
        outcome(step)
    saved = outcome(gain.save, work / "again.safetensors")
    if not failed(saved):
        again = outcome(gf.load, saved, allow_negative=True)
        assert not failed(again), again
        assert all(np.array_equal(again.vectors[k], v) for k, v in gain.vectors.items())
    plan = outcome(make_plan, open_checkpoint(base), gain, allow_negative=negative)
    result = outcome(api.apply, base, [path], work / "out", allow_negative=negative, verify=True,
                     allow_base_mismatch=True, warn=lambda _m: None)
    if not failed(plan) and not failed(result):
        assert result.verified
    assert not failed(plan) or failed(result)


@pytest.mark.parametrize("value", [3e38, 1e-30])
def test_stacking_gains_whose_product_leaves_float32_is_one_line(value):
    """Regression (fuzz): the product overflowed to inf (or underflowed to 0) with numpy's RuntimeWarning
    on stderr, and only saving the stack refused it."""
    import warnings

    g = gf.GainFile({"w": np.full(3, value, np.float32)}, {"w": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(GainFileError, match="overflows or underflows float32"):
            gf.stack([g, g], ["a.safetensors", "b.safetensors"])


# --------------------------------------------------------------------------- checkpoints: index, config, shards


@st.composite
def checkpoint_parts(draw):
    which = draw(st.sampled_from(["none", "index", "config", "shard", "shard", "index+config"]))
    index = config = shard = None
    if "index" in which:
        index = draw(json_text(index_doc(), 2, keys=["weight_map", "metadata"]))
    if "config" in which:
        config = draw(json_text(CONFIG, 2, keys=list(CONFIG) + ["quantization_config", "n_layer", "num_layers",
                                                            "dtype"]))
    if which == "shard":
        name = draw(st.sampled_from(list(SHARDS)))
        header, data = shard_parts(SHARDS[name])
        shard = (name, draw(safetensors_file(header, data, 2, keys=["__metadata__", "dtype", "shape",
                                                                  "data_offsets"])))
    return index, config, shard


@fuzz_settings(100)
@given(parts=checkpoint_parts())
@example(parts=(json.dumps({"weight_map": {"x": "../model.safetensors"}}).encode(), None, None))
@example(parts=(None, json.dumps({"model_type": "llama", "text_config": "x"}).encode(), None))
# Regression: a config claiming 2**31 layers made the target check build range(2**31) (a MemoryError under
# the budget, tens of GB without it); 2**63 an OverflowError.
@example(parts=(None, json.dumps({**CONFIG, "num_hidden_layers": 2**31 - 1}).encode(), None))
@example(parts=(None, json.dumps({**CONFIG, "num_hidden_layers": 2**63}).encode(), None))
def test_checkpoint_opens_or_one_line_and_commands_take_what_opens(parts, scratch):
    index, config, shard = parts
    folder = make_base(scratch() / "base", index=index, config=config, shard=shard)
    ckpt = outcome(open_checkpoint, folder)
    if failed(ckpt):
        assert isinstance(ckpt, CheckpointError), ckpt
        return
    assert set(ckpt.tensors) <= {n for n, _, _ in BASE_TENSORS} | set().union(
        *(set(s.tensors) for s in ckpt.shards.values()))
    outcome(quantization_note, ckpt)
    outcome(fingerprint, ckpt)
    found = outcome(api.targets, folder, "gain-ffn", fingerprint=True)
    if not failed(found):
        gain = found.identity()
        path = folder.parent / "identity.safetensors"
        gain.save(path)
        outcome(api.apply, folder, [path], folder.parent / "out", verify=True, warn=lambda _m: None)


# --------------------------------------------------------------------------- provenance (gainsurgery.json)


@pytest.fixture(scope="module")
def merged(base, tmp_path_factory) -> Path:
    """A real merged folder (apply of a small gain): its gainsurgery.json is the seed."""
    work = tmp_path_factory.mktemp("fuzz-merged")
    gain = gf.GainFile({k: np.full(GAIN_LENGTHS[k], 1.5, np.float32) for k in GAIN_KEYS}, {k: 1 for k in GAIN_KEYS},
                       {"method": "gain-ffn", "side": "in", "description": "seed"})
    gain.save(work / "g.safetensors")
    api.apply(base, [work / "g.safetensors"], work / "merged", warn=lambda _m: None)
    return work / "merged"


@fuzz_settings(80)
@given(data=st.data())
def test_provenance_gives_a_card_or_one_line(data, merged, scratch):
    seed = json.loads((merged / "gainsurgery.json").read_text())
    raw = data.draw(json_text(seed, max_mutations=4, keys=list(seed) + ["shards", "gains", "base"]))
    folder = scratch() / "merged"
    shutil.copytree(merged, folder)
    (folder / "README.md").unlink()  # the card is made from gainsurgery.json
    write(folder / "gainsurgery.json", raw)
    got = outcome(api.push, folder, "me/merged", dry_run=True)
    if not failed(got):
        card = [i for i in got.items if i.path_in_repo == "README.md"]
        assert len(card) == 1


def test_provenance_whose_gains_is_not_a_list_gives_a_card(merged, tmp_path):
    """Regression (fuzz): "gains": 1 in gainsurgery.json made the card's loop a TypeError traceback."""
    folder = tmp_path / "merged"
    shutil.copytree(merged, folder)
    (folder / "README.md").unlink()
    record = json.loads((folder / "gainsurgery.json").read_text())
    for odd in (1, "x", {"a": 1}, None):
        write(folder / "gainsurgery.json", json.dumps({**record, "gains": odd}).encode())
        card = next(i for i in api.push(folder, "me/merged", dry_run=True).items if i.path_in_repo == "README.md")
        assert card is not None


# --------------------------------------------------------------------------- claim files


TOKEN = "0123456789abcdef" * 2


@fuzz_settings(80)
@given(raw=json_text({"format": "gainsurgery.claim/1", "out": "merged", "token": TOKEN, "pid": 1, "host": "h"},
                     keys=["format", "out", "token"]))
@example(raw=b"")
@example(raw=json.dumps({"format": "gainsurgery.claim/1", "out": "merged", "token": TOKEN}).encode())
@example(raw=render(Dup([("format", "gainsurgery.claim/1"), ("out", "other"), ("out", "merged"),
                         ("token", TOKEN)])).encode())
@example(raw=render({"format": "gainsurgery.claim/1", "out": "merged", "token": TOKEN, "pid": Raw("1e999")}).encode())
def test_claim_file_is_judged_without_error_and_only_ours_is_removed(raw, scratch):
    parent = scratch()
    claim = parent / f".merged.gainsurgery-{TOKEN}.claim"
    tmp = parent / f".merged.gainsurgery-{TOKEN}.tmp"
    write(claim, raw)
    tmp.mkdir()
    (tmp / "data").write_bytes(b"x")
    handled = outcome(clean_leftovers, parent / "merged")
    assert not failed(handled), handled
    try:
        content = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        content = None
    ours = (isinstance(content, dict) and content.get("format") == "gainsurgery.claim/1"
            and content.get("out") == "merged" and content.get("token") == TOKEN)
    if not ours:  # not provably ours: the temp is never touched
        assert tmp.is_dir() and (tmp / "data").exists(), handled


def test_a_layer_number_of_5000_digits_is_one_line():
    """Regression (reading the code the fuzzer drives): int() of a 5,000-digit layer number in a tensor
    name is a ValueError (Python's digit limit); a name with a newline broke the message in two."""
    from gainsurgery.architectures import resolve_targets
    from gainsurgery.errors import ArchitectureError

    for name in (f"model.layers.{'9' * 5000}.self_attn.o_proj.weight", "x\nmodel.layers.0.self_attn.o_proj.weight"):
        with pytest.raises(ArchitectureError) as e:
            resolve_targets({name: [4] if "\n" in name else [4, 4]}, "llama", "gain")
        assert str(e.value).isprintable() and len(str(e.value)) < 600
