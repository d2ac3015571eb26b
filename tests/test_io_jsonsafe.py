"""Hostile JSON: size, depth, duplicates, strictness, typed accessors, JSON lines."""

from __future__ import annotations

import io
import json
import os
import threading

import pytest

from gainsurgery.errors import CheckpointError, GainFileError, GainSurgeryError, UnsafeInputError
from gainsurgery.io import jsonsafe
from gainsurgery.io.jsonsafe import (
    Fields,
    expect_int,
    expect_number,
    expect_object,
    expect_str_list,
    expect_str_map,
    iter_jsonl,
    load,
    loads,
    nesting_depth,
)

DEEP = 200_000


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("opener,closer", [("[", "]"), ('{"a":', "}")])
def test_200k_deep_is_one_line_not_recursion_error(opener, closer):
    text = opener * DEEP + "1" + closer * DEEP
    with pytest.raises(CheckpointError) as e:
        loads(text, where="model.safetensors header", error=CheckpointError)
    assert one_line(e) == "model.safetensors header: JSON nested deeper than 64 levels"


def test_200k_deep_unclosed_and_from_a_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("[" * DEEP)
    with pytest.raises(CheckpointError) as e:
        load(p, error=CheckpointError)
    assert one_line(e) == f"{p}: JSON nested deeper than 64 levels"


def test_depth_scan_is_flat_and_counts_exactly():
    # Brackets inside strings (with escaped quotes) do not count.
    assert nesting_depth('{"a": "[[[[\\"{{{{", "b": [[1], {"c": []}]}', 64) == 4
    assert nesting_depth("[]" * 1000, 64) == 1
    assert nesting_depth("[" * DEEP, 10) == 11  # stops right after passing the limit
    assert nesting_depth('"no brackets"', 64) == 0


def test_depth_limit_is_exact():
    ok = "[" * 64 + "]" * 64
    assert loads(ok, where="x") == json.loads(ok)
    with pytest.raises(GainSurgeryError, match=r"^x: JSON nested deeper than 64 levels$"):
        loads("[" + ok + "]", where="x")
    with pytest.raises(GainSurgeryError, match=r"^x: JSON nested deeper than 3 levels$"):
        loads('{"a": {"b": {"c": {}}}}', where="x", max_depth=3)


def test_depth_ceiling_guards_the_c_parser():
    with pytest.raises(ValueError, match="max_depth"):
        loads("[]", where="x", max_depth=10_000)


def test_size_limit_bytes_and_str():
    with pytest.raises(GainFileError) as e:
        loads(b" " * 101 + b"{}", where="g.safetensors metadata", error=GainFileError, max_bytes=100)
    assert one_line(e) == "g.safetensors metadata: 103 bytes of JSON, more than the 100 allowed"
    # str input: the limit is in UTF-8 bytes, not characters ("é" is 2 bytes).
    with pytest.raises(GainSurgeryError, match=r"^x: 12 bytes of JSON, more than the 10 allowed$"):
        loads('"ééééé"', where="x", max_bytes=10)


def test_huge_file_never_read_past_limit(tmp_path):
    # 64 MiB of valid JSON against a 1 MiB limit: refused, and only limit+1 bytes are read.
    p = tmp_path / "model.safetensors.index.json"
    with open(p, "wb") as f:
        f.write(b'{"a": "')
        f.write(b"x" * (64 << 20))
        f.write(b'"}')
    with pytest.raises(CheckpointError) as e:
        load(p, error=CheckpointError, max_bytes=1 << 20)
    assert one_line(e) == f"{p}: more than the 1048576 bytes allowed for this JSON file"

    class Counting(io.BytesIO):
        read_total = 0

        def read(self, n=-1):
            data = super().read(n)
            Counting.read_total += len(data)
            return data

    src = Counting(b"[" + b"0," * (8 << 20) + b"0]")
    with pytest.raises(CheckpointError):
        load(src, where="index", error=CheckpointError, max_bytes=1000)
    assert Counting.read_total == 1001


def test_huge_valid_json_within_limit_parses(tmp_path):
    doc = {"weight_map": {f"model.layers.{i}.mlp.down_proj.weight": f"model-{i % 7:05d}-of-00007.safetensors"
                          for i in range(100_000)}}
    p = tmp_path / "model.safetensors.index.json"
    p.write_text(json.dumps(doc))
    assert p.stat().st_size > 6_000_000
    assert load(p, error=CheckpointError) == doc


def test_duplicate_keys_refused_when_asked():
    text = '{"w": {"dtype": "F32"}, "b": 1, "w": {"dtype": "F16"}}'
    assert loads(text, where="h")["w"] == {"dtype": "F16"}  # plain JSON: last wins
    with pytest.raises(CheckpointError) as e:
        loads(text, where="model-00001.safetensors header", error=CheckpointError, unique_keys=True)
    assert one_line(e) == "model-00001.safetensors header: not valid JSON (duplicate key w)"
    # Nested duplicates too.
    with pytest.raises(CheckpointError, match=r"duplicate key dims"):
        loads('{"__metadata__": {"dims": "1", "dims": "2"}}', where="h", error=CheckpointError, unique_keys=True)


def test_duplicate_key_with_newline_is_shown_on_one_line():
    with pytest.raises(GainSurgeryError) as e:
        loads('{"a\\nb": 1, "a\\nb": 2}', where="h", unique_keys=True)
    assert one_line(e) == "h: not valid JSON (duplicate key 'a\\nb')"


@pytest.mark.parametrize("text,reason", [
    ('{"a": NaN}', "NaN is not valid JSON"),
    ('[Infinity]', "Infinity is not valid JSON"),
    ('[-Infinity]', "-Infinity is not valid JSON"),
    ('[1e999]', "number 1e999 overflows a float"),
])
def test_non_finite_numbers_refused(text, reason):
    with pytest.raises(GainSurgeryError) as e:
        loads(text, where="config.json")
    assert one_line(e) == f"config.json: not valid JSON ({reason})"


def test_int_beyond_digit_limit_is_one_line():
    with pytest.raises(GainSurgeryError) as e:
        loads("[" + "9" * 10_000 + "]", where="config.json")
    assert one_line(e).startswith("config.json: not valid JSON (")


@pytest.mark.parametrize("data,msg", [
    (b'{"a": 1', "config.json: not valid JSON (Expecting ',' delimiter at line 1 column 8)"),
    (b"", "config.json: not valid JSON (Expecting value at line 1 column 1)"),
    (b'{"a": "\xff"}', "config.json: not valid UTF-8 (at byte 7)"),
    (b'\xef\xbb\xbf{}', "config.json: not valid JSON (Unexpected UTF-8 BOM (decode using utf-8-sig) at line 1 column 1)"),
])
def test_malformed_is_one_line(data, msg):
    with pytest.raises(GainSurgeryError) as e:
        loads(data, where="config.json")
    assert one_line(e) == msg


def test_load_refuses_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    result: list[BaseException | None] = []

    def run():
        try:
            load(fifo, error=CheckpointError)
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - the result is what is asserted
            result.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)  # safety net only: the assertion is on the result
    assert len(result) == 1, "load() blocked on a FIFO"
    assert isinstance(result[0], CheckpointError)
    assert str(result[0]) == f"{fifo}: is a FIFO (named pipe), not a regular file; refusing to read it"


def test_load_missing_file(tmp_path):
    with pytest.raises(GainFileError) as e:
        load(tmp_path / "nope.json", error=GainFileError)
    assert one_line(e) == f"{tmp_path / 'nope.json'}: no such file"


def test_load_default_error_is_unsafe_input_for_proc():
    with pytest.raises(UnsafeInputError, match=r"under /proc; refusing to read it$"):
        load("/proc/self/environ", error=UnsafeInputError)


# -- JSON lines -------------------------------------------------------------------

def test_jsonl_reads_values_with_line_numbers(tmp_path):
    p = tmp_path / "manifest.jsonl"
    p.write_bytes(b'{"name": "a"}\n\n  \r\n{"name": "b"}\r\n[1, 2]')
    assert list(iter_jsonl(p)) == [(1, {"name": "a"}), (4, {"name": "b"}), (5, [1, 2])]


def test_jsonl_limits_per_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"ok": 1}\n' + b"[" * (6 * DEEP) + b"\n")
    with pytest.raises(CheckpointError) as e:
        list(iter_jsonl(p, error=CheckpointError))
    assert one_line(e) == f"{p}:2: line longer than the 1048576 bytes allowed"
    with pytest.raises(CheckpointError) as e:
        list(iter_jsonl(p, error=CheckpointError, max_line_bytes=2_000_000))
    assert one_line(e) == f"{p}:2: JSON nested deeper than 64 levels"


def test_jsonl_line_limit_exact_and_duplicates(tmp_path):
    p = tmp_path / "m.jsonl"
    line = b'{"k": "' + b"x" * 91 + b'"}'  # exactly 100 bytes
    assert len(line) == 100
    p.write_bytes(line + b"\r\n" + line + b"x\n")
    rows = iter_jsonl(p, max_line_bytes=100)
    assert next(rows)[0] == 1
    with pytest.raises(GainSurgeryError, match=r":2: line longer than the 100 bytes allowed$"):
        next(rows)
    p.write_bytes(b'{"a": 1, "a": 2}\n')
    with pytest.raises(GainSurgeryError, match=r"^.*m\.jsonl:1: not valid JSON \(duplicate key a\)$"):
        list(iter_jsonl(p, unique_keys=True))


def test_jsonl_max_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text("1\n2\n3\n")
    assert [v for _, v in iter_jsonl(p, max_lines=3)] == [1, 2, 3]
    with pytest.raises(GainSurgeryError, match=r"m\.jsonl: more than the 2 lines allowed$"):
        list(iter_jsonl(p, max_lines=2))


# -- typed accessors -----------------------------------------------------------------

def test_expect_helpers_name_file_and_field():
    with pytest.raises(CheckpointError) as e:
        expect_object([], where="config.json", error=CheckpointError)
    assert one_line(e) == "config.json: expected object, got array"
    with pytest.raises(CheckpointError) as e:
        expect_int(True, where="config.json", field="num_hidden_layers", error=CheckpointError)
    assert one_line(e) == "config.json: num_hidden_layers: expected integer, got boolean"
    assert expect_int(12, where="c", field="n", min=1, max=12) == 12
    with pytest.raises(GainSurgeryError, match=r"^c: n: 0 is below the minimum 1$"):
        expect_int(0, where="c", field="n", min=1)
    with pytest.raises(GainSurgeryError, match=r"^c: n: 13 is above the maximum 12$"):
        expect_int(13, where="c", field="n", max=12)
    assert expect_number(3, where="c") == 3.0
    with pytest.raises(GainSurgeryError, match=r"^c: eps: expected number, got boolean$"):
        expect_number(False, where="c", field="eps")
    with pytest.raises(GainSurgeryError, match=r"^c: eps: number is not finite$"):
        expect_number(10 ** 400, where="c", field="eps")


def test_str_list_and_str_map():
    assert expect_str_list(["q", "k"], where="a") == ["q", "k"]
    with pytest.raises(GainSurgeryError) as e:
        expect_str_list(["q_proj", 3], where="adapter_config.json", field="target_modules")
    assert one_line(e) == "adapter_config.json: target_modules[1]: expected string, got integer"
    with pytest.raises(GainSurgeryError) as e:
        expect_str_list("q_proj", where="adapter_config.json", field="target_modules")
    assert one_line(e) == "adapter_config.json: target_modules: expected array of strings, got string"
    assert expect_str_map({"format": "pt"}, where="h", field="__metadata__") == {"format": "pt"}
    for bad, got in (([], "array"), (False, "boolean"), (None, "null")):
        with pytest.raises(CheckpointError) as e:
            expect_str_map(bad, where="m.safetensors header", field="__metadata__", error=CheckpointError)
        assert one_line(e) == f"m.safetensors header: __metadata__: expected object of strings, got {got}"
    with pytest.raises(CheckpointError) as e:
        expect_str_map({"a": "1", "n": 1}, where="h", field="__metadata__", error=CheckpointError)
    assert one_line(e) == "h: __metadata__.n: expected string, got integer"


def test_fields_nested_paths_and_defaults():
    cfg = Fields(loads('{"model_type": ["llama"], "text_config": "oops", "n": 3, "v": null, '
                       '"sub": {"hidden_size": 640, "act": "gelu", "tie": true, "mods": ["a"], '
                       '"meta": {"k": "v"}, "eps": 1e-6}}', where="config.json", error=CheckpointError),
                 where="config.json", error=CheckpointError)
    with pytest.raises(CheckpointError) as e:
        cfg.str("model_type")
    assert one_line(e) == "config.json: model_type: expected string, got array"
    with pytest.raises(CheckpointError) as e:
        cfg.obj("text_config")
    assert one_line(e) == "config.json: text_config: expected object, got string"
    with pytest.raises(CheckpointError) as e:
        cfg.str("architectures")
    assert one_line(e) == "config.json: architectures: missing"
    with pytest.raises(CheckpointError) as e:
        cfg.int("v")
    assert one_line(e) == "config.json: v: null, a value is required"
    assert cfg.int("v", None) is None
    assert cfg.str("absent", "default") == "default"
    sub = cfg.obj("sub")
    assert (sub.int("hidden_size", min=1), sub.str("act"), sub.bool("tie"), sub.str_list("mods"),
            sub.str_map("meta"), sub.number("eps")) == (640, "gelu", True, ["a"], {"k": "v"}, 1e-6)
    with pytest.raises(CheckpointError) as e:
        sub.int("tie")
    assert one_line(e) == "config.json: sub.tie: expected integer, got boolean"
    with pytest.raises(CheckpointError) as e:
        sub.obj("meta").int("k")
    assert one_line(e) == "config.json: sub.meta.k: expected integer, got string"
    assert cfg.keys() == ["model_type", "text_config", "n", "v", "sub"]
    assert "n" in cfg and "zz" not in cfg
    assert cfg.raw("model_type") == ["llama"]
    with pytest.raises(CheckpointError, match=r"^config.json: act: string of 4 characters, more than the 3"):
        Fields({"act": "gelu"}, where="config.json", error=CheckpointError).str("act", max_chars=3)


def test_fields_top_level_not_object():
    with pytest.raises(GainFileError) as e:
        Fields("x", where="gainsurgery.json", error=GainFileError)
    assert one_line(e) == "gainsurgery.json: expected object, got string"


def test_module_limits_are_sane():
    assert jsonsafe.DEFAULT_MAX_DEPTH < jsonsafe.MAX_DEPTH_CEILING < 1000
