"""The declared floors of the core dependencies are true: the core commands work at exactly those versions.

Builds a fresh venv, installs huggingface-hub at its floor (with its own dependencies),
then numpy, safetensors, click and tqdm at exactly their floors (``--no-deps``: whatever
huggingface_hub would pull), then gainsurgery itself without dependencies, and runs
targets / stack / invert / inspect / apply --verify / verify / push on a small checkpoint,
and apply from a Hub base (both against the loopback Hub). The merged shards must be
byte-identical to the ones this environment writes.
Needs PyPI (marked ``network``); takes a minute or two.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from packaging.version import Version
from safetensors.numpy import save_file

from gainsurgery import api
from gainsurgery.gainfile import GainFile

pytestmark = pytest.mark.network

ROOT = Path(__file__).resolve().parents[1]


def core_floors() -> dict[str, str]:
    """name -> floor version, from pyproject.toml's [project] dependencies."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)>=([0-9.]+)", dep.replace(" ", ""))
        assert m, f"core dependency without a plain floor: {dep}"
        floors[m[1].lower()] = m[2]
    return floors


def small_checkpoint(folder: Path) -> Path:
    """A two-layer llama-named checkpoint in two shards (float32 and float16), written with numpy."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    shards = {
        "model-00001-of-00002.safetensors": {
            "model.embed_tokens.weight": rng.normal(size=(16, 8)).astype(np.float32),
            "model.layers.0.self_attn.o_proj.weight": rng.normal(size=(8, 8)).astype(np.float32),
            "model.layers.0.mlp.down_proj.weight": rng.normal(size=(8, 16)).astype(np.float32),
        },
        "model-00002-of-00002.safetensors": {
            "model.layers.1.self_attn.o_proj.weight": rng.normal(size=(8, 8)).astype(np.float16),
            "model.layers.1.mlp.down_proj.weight": rng.normal(size=(8, 16)).astype(np.float16),
        },
    }
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return folder


def test_core_commands_at_the_floor_versions(tmp_path, hub):
    floors = core_floors()
    assert set(floors) == {"numpy", "safetensors", "click", "tqdm", "huggingface-hub"}
    if sys.version_info >= (3, 12) and floors["numpy"] == "1.24":  # no numpy 1.24 wheels for 3.12+
        floors["numpy"] = "1.26.0"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip, bindir = str(venv / "bin" / "pip"), venv / "bin"

    def install(*args: str) -> None:
        res = subprocess.run([pip, "install", "-q", "--disable-pip-version-check", *args], capture_output=True,
                             text=True)
        assert res.returncode == 0, res.stderr[-3000:]

    install(f"huggingface-hub=={floors['huggingface-hub']}")
    install("--no-deps", *(f"{name}=={version}" for name, version in floors.items() if name != "huggingface-hub"))
    install("--no-deps", str(ROOT))
    code = "import importlib.metadata as m; import json; print(json.dumps({d: m.version(d) for d in %r}))" % sorted(floors)
    versions = json.loads(subprocess.run([str(bindir / "python"), "-c", code], capture_output=True, text=True,
                                         check=True).stdout)
    print("installed at the floors:", versions)
    assert {k: Version(v) for k, v in versions.items()} == {k: Version(v) for k, v in floors.items()}

    base = small_checkpoint(tmp_path / "base")
    rng = np.random.default_rng(1)
    keys = {t.key: (t.dim, t.length) for t in api.targets(base).targets}
    for name in ("a", "b"):
        GainFile({k: np.exp(rng.normal(0, 0.2, n)).astype(np.float32) for k, (_, n) in keys.items()},
                 {k: d for k, (d, _) in keys.items()}, {"method": "gain-ffn"}).save(tmp_path / f"{name}.safetensors")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def gs(*args) -> subprocess.CompletedProcess:
        res = subprocess.run([str(bindir / "gainsurgery"), *map(str, args)], capture_output=True, text=True,
                             env=env, cwd=tmp_path)
        assert res.returncode == 0, (args, res.stderr[-3000:])
        return res

    assert json.loads(gs("targets", base, "--json").stdout)["parameters"] == 2 * (8 + 16)
    gs("targets", base, "--init", "ones", "-o", tmp_path / "id.safetensors")
    gs("stack", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o", tmp_path / "ab.safetensors")
    gs("invert", tmp_path / "a.safetensors", "-o", tmp_path / "inv.safetensors")
    assert json.loads(gs("inspect", tmp_path / "ab.safetensors", "--json").stdout)["parameters"] == 48
    gs("apply", base, tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m", "--verify")
    gs("verify", base, tmp_path / "ab.safetensors", tmp_path / "m")
    gs("push", tmp_path / "m", "me/merged", "--dry-run")
    gs("push", tmp_path / "m", "testuser/merged")  # the loopback Hub, through HF_ENDPOINT / HF_TOKEN
    assert {p for p in hub.repos["testuser/merged"].files_at("main")} >= {p.name for p in (tmp_path / "m").iterdir()}
    gs("apply", "testuser/merged", tmp_path / "inv.safetensors", tmp_path / "from-hub")  # range-read headers, shards

    api.apply(base, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "here")
    for shard in base.glob("*.safetensors"):
        assert (tmp_path / "m" / shard.name).read_bytes() == (tmp_path / "here" / shard.name).read_bytes()
