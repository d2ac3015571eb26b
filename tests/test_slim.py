"""The core commands work without the optional extras; the others say which extra they need.

Each command runs in a real subprocess in which importing torch, transformers,
accelerate, peft or matplotlib is blocked (a ``sys.meta_path`` finder that raises
ModuleNotFoundError and records the attempt), as in a plain ``pip install gainsurgery``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import random_gain

BLOCKED = ("torch", "transformers", "accelerate", "peft", "matplotlib")

RUN_BLOCKED = r"""
import importlib.abc, os, sys

BLOCKED = set(os.environ["GS_BLOCKED"].split(","))
attempts = []

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: not installed)", name=name)
        return None

sys.meta_path.insert(0, Blocker())
try:
    from gainsurgery.cli import main
    main(prog_name="gainsurgery")
finally:
    with open(os.environ["GS_ATTEMPTS"], "w") as f:
        f.write("\n".join(attempts))
"""


def run_slim(tmp_path: Path, *args) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``gainsurgery ARGS`` with the extras blocked; returns the result and the blocked import attempts."""
    attempts = tmp_path / f"attempts-{len(list(tmp_path.glob('attempts-*')))}.txt"
    env = {**os.environ, "GS_BLOCKED": ",".join(BLOCKED), "GS_ATTEMPTS": str(attempts)}
    res = subprocess.run([sys.executable, "-c", RUN_BLOCKED, *map(str, args)], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    tried = [line for line in attempts.read_text().splitlines() if line] if attempts.exists() else []
    return res, tried


def test_core_commands_need_no_extras(tiny_ckpt, tmp_path):
    base = tiny_ckpt("llama", "bfloat16")
    random_gain(base, "gain-ffn", seed=1).save(tmp_path / "a.safetensors")
    random_gain(base, "gain", seed=2).save(tmp_path / "b.safetensors")
    runs = {
        "targets": ("targets", base, "--method", "gain-ffn", "--json"),
        "targets --init": ("targets", base, "--init", "ones", "-o", tmp_path / "id.safetensors"),
        "stack": ("stack", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o", tmp_path / "ab.safetensors"),
        "invert": ("invert", tmp_path / "a.safetensors", "-o", tmp_path / "inv.safetensors"),
        "inspect": ("inspect", tmp_path / "ab.safetensors", "--json"),
        "apply": ("apply", base, tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m", "--verify"),
        "verify": ("verify", base, tmp_path / "ab.safetensors", tmp_path / "m"),
        "push --dry-run (folder)": ("push", tmp_path / "m", "me/merged", "--dry-run", "--json"),
        "push --dry-run (gain)": ("push", tmp_path / "ab.safetensors", "me/gain", "--dry-run"),
    }
    for what, args in runs.items():
        res, tried = run_slim(tmp_path, *args)
        assert res.returncode == 0, (what, res.stderr)
        assert tried == [], (what, tried)
    assert json.loads(run_slim(tmp_path, "targets", base, "--json")[0].stdout)["parameters"] == 2 * (32 + 64)
    assert (tmp_path / "m" / "gainsurgery.json").is_file() and (tmp_path / "inv.safetensors").is_file()


@pytest.mark.parametrize("args,message", [
    (("train", "BASE", "--data", "DATA", "-o", "g.safetensors"),
     'gainsurgery train needs the training extra: pip install "gainsurgery[train]"'),
    (("eval", "BASE", "--data", "legal=DATA"),
     'gainsurgery eval needs the training extra: pip install "gainsurgery[train]"'),
    (("export-peft", "GAIN", "adapter", "--base", "BASE"),
     'gainsurgery export-peft needs the training extra: pip install "gainsurgery[train]"'),
    (("import-peft", "adapter", "-o", "g.safetensors", "--base", "BASE"),
     'gainsurgery import-peft needs the training extra: pip install "gainsurgery[train]"'),
    (("inspect", "GAIN", "--plot", "g.png"),
     'gainsurgery inspect --plot needs the plots extra: pip install "gainsurgery[plots]"'),
    (("demo",), 'gainsurgery demo needs the demo extra: pip install "gainsurgery[demo]"'),
])
def test_commands_name_the_extra_they_need(tiny_ckpt, tmp_path, args, message):
    base = tiny_ckpt("llama", "bfloat16")
    gain = random_gain(base, "gain", seed=3).save(tmp_path / "g.safetensors")
    (tmp_path / "data.txt").write_text("some text\n")
    (tmp_path / "adapter").mkdir()
    subst = {"BASE": base, "DATA": tmp_path / "data.txt", "GAIN": gain}
    res, _ = run_slim(tmp_path, *[subst.get(a, a) for a in args])
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip() == f"error: {message}"
    assert not (tmp_path / "g.png").exists()


def _many_targets_checkpoint(folder: Path, layers: int) -> Path:
    """A llama-named checkpoint with many tiny layers (for long `targets` output), written with numpy."""
    folder.mkdir()
    tensors = {}
    for i in range(layers):
        tensors[f"model.layers.{i}.self_attn.o_proj.weight"] = np.zeros((2, 2), np.float32)
        tensors[f"model.layers.{i}.mlp.down_proj.weight"] = np.zeros((2, 4), np.float32)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    return folder


@pytest.mark.parametrize("command", ["inspect", "targets"])
def test_closed_stdout_is_a_normal_end(tmp_path, command):
    """`gainsurgery inspect G | head -1`: the reader leaves early; we exit 0 without a word."""
    base = _many_targets_checkpoint(tmp_path / "base", 2000)  # ~300 KB of output: more than a pipe holds
    from gainsurgery import api

    api.targets(base).identity().save(tmp_path / "g.safetensors")
    args = ["inspect", str(tmp_path / "g.safetensors")] if command == "inspect" else ["targets", str(base)]
    proc = subprocess.Popen([sys.executable, "-m", "gainsurgery.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after its line
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 0, stderr
    assert first and stderr == ""
