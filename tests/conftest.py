"""Shared fixtures: tiny real checkpoints, random gain files, the real CLI."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, os.path.dirname(__file__))

# No test reaches the real Hub: the default endpoint is a closed loopback port, and
# tests that need a Hub start the loopback one (fixture ``hub``, which sets HF_ENDPOINT).
# HF_HUB_OFFLINE stays unset: huggingface_hub reads it once, at import, and it would
# refuse the loopback Hub too. Xet is off so uploads use LFS, which the loopback Hub speaks.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.pop("TRANSFORMERS_OFFLINE", None)
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from gainsurgery.architectures import num_layers, resolve_targets  # noqa: E402
from gainsurgery.io.checkpoint import open_checkpoint  # noqa: E402
from gainsurgery.cli import main  # noqa: E402
from gainsurgery.gainfile import GainFile  # noqa: E402
from conftest_hub import hub  # noqa: E402,F401  (the loopback Hub fixture)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Factory: (model_type, dtype name) -> folder of a saved tiny sharded checkpoint (cached)."""
    import torch

    from models import build_model, save_tiny

    cache: dict = {}

    def make(model_type: str, dtype: str = "bfloat16", seed: int = 0) -> Path:
        key = (model_type, dtype, seed)
        if key not in cache:
            model = build_model(model_type, getattr(torch, dtype), seed=seed)
            cache[key] = save_tiny(model, tmp_path_factory.mktemp(f"{model_type}-{dtype}") / "base")
        return cache[key]

    return make


def random_gain(base: Path, method: str = "gain-ffn", side: str = "in", seed: int = 0,
                spread: float = 0.2) -> GainFile:
    """A gain file for every GAIN target of ``base`` with log-normal values around 1."""
    ckpt = open_checkpoint(base)
    targets = resolve_targets({n: t.shape for n, t in ckpt.tensors.items()}, ckpt.config["model_type"],
                              method, side, num_layers(ckpt.config))
    rng = np.random.default_rng(seed)
    vectors, dims = {}, {}
    by_weight: dict[str, np.ndarray] = {}
    for t in targets:
        if t.kind == "bias":  # output side: the bias takes its weight's vector
            vectors[t.key] = by_weight[t.key[: -len("bias")] + "weight"]
        else:
            vectors[t.key] = np.exp(rng.normal(0, spread, t.length)).astype(np.float32)
            by_weight[t.key] = vectors[t.key]
        dims[t.key] = t.dim
    return GainFile(vectors, dims, {"method": method, "side": side})


@pytest.fixture
def cli():
    """Run the real CLI in-process: cli('apply', base, gain, out) -> click Result."""
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return run


@pytest.fixture
def fake_embedded(tiny_ckpt, tmp_path, monkeypatch):
    """``embedded:tiny-test``: a tiny llama checkpoint, already converted in a private cache, whose
    record has Gemma 3 270M's facts (license, upstream). Returns (spec, folder)."""
    import json
    import shutil
    from dataclasses import replace

    from gainsurgery.sources import embedded

    cache = tmp_path / "gainsurgery-cache"
    folder = embedded.embedded_dir("tiny-test", cache)
    shutil.copytree(tiny_ckpt("llama", "float32"), folder)
    (folder / embedded.MARKER_NAME).write_text(json.dumps({"conversion_version": embedded.CONVERSION_VERSION}))
    monkeypatch.setenv("GAINSURGERY_CACHE", str(cache))
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "tiny-test",
                        replace(embedded.EMBEDDED_MODELS["gemma-3-270m"], name="tiny-test"))
    return "embedded:tiny-test", folder
