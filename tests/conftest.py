"""Shared fixtures: tiny real checkpoints, random gain files, the real CLI.

Hermetic by construction: no test reads or writes the HOME-side caches of the
person running it. At import, HOME and every cache variable point into one
temporary folder of this process (so even session fixtures and imports see no real
cache), and the autouse fixture ``hermetic_home`` gives every test a fresh, empty
one of its own. The single shared thing is the embedded model's converted weights
(fixture ``embedded_cache``): one folder per test session, converted at most once
and shared by the xdist workers of that session, never the user's cache.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
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
# A test run launched by torchrun must not make the in-process CLI act as a launched worker
# (gainsurgery.training.distributed.end_launched_process ends such a process when its command is
# done); the tests that want workers start torchrun themselves.
for _name in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT"):
    os.environ.pop(_name, None)

#: Environment variables that name a HOME-side cache, config or credential. Every test
#: gets its own empty folders for the first ones and none of the credentials.
CACHE_VARIABLES = ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "HF_HOME",
                   "GAINSURGERY_CACHE", "MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
UNSET_VARIABLES = ("HF_HUB_CACHE", "HF_XET_CACHE", "HF_ASSETS_CACHE", "HF_DATASETS_CACHE",
                   "TRANSFORMERS_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH",
                   "HF_STORED_TOKENS_PATH")


def _point_caches_at(root: Path, env=os.environ) -> dict[str, str]:
    """The values of CACHE_VARIABLES under ``root`` (folders created); sets them in ``env``."""
    values = {name: str(root / name.lower()) for name in CACHE_VARIABLES}
    for value in values.values():
        Path(value).mkdir(parents=True, exist_ok=True)
    env.update(values)
    for name in UNSET_VARIABLES:
        env.pop(name, None)
    return values


# pip's download cache is not ours to hide, and reusing it only saves downloads.
os.environ.setdefault("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
_PROCESS_HOME = Path(tempfile.mkdtemp(prefix="gainsurgery-tests-home-"))
atexit.register(shutil.rmtree, _PROCESS_HOME, True)
_point_caches_at(_PROCESS_HOME)

from gainsurgery.architectures import num_layers, resolve_targets  # noqa: E402
from gainsurgery.io.checkpoint import open_checkpoint  # noqa: E402
from gainsurgery.io.fingerprint import base_tensors_sha256  # noqa: E402
from gainsurgery.cli import main  # noqa: E402
from gainsurgery.gainfile import GainFile  # noqa: E402
from conftest_hub import hub  # noqa: E402,F401  (the loopback Hub fixture)


@pytest.fixture(autouse=True)
def hermetic_home(tmp_path_factory, monkeypatch) -> Path:
    """Every test: a fresh, empty HOME, XDG and HF folders and gainsurgery cache, no token.

    Returns the folder that holds them. A test that needs the lab's built-in corpora builds
    a tiny one itself; a test that needs the real embedded model takes ``embedded_cache``.
    """
    root = tmp_path_factory.mktemp("home")
    values = _point_caches_at(root, env={})
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    for name in UNSET_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return root


def _session_folder(tmp_path_factory) -> Path:
    """A folder of this test session shared by its xdist workers (each worker's base temp
    folder lies inside the session's)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def embedded_cache_dir(tmp_path_factory) -> Path:
    """The one cache the suite shares: a gainsurgery cache folder, per test session, for the
    embedded model's converted weights. The first test that resolves ``embedded:NAME``
    converts it (about a minute); the others, in any worker, find it there (the conversion
    holds a lock). It starts empty in every session and is never the user's cache."""
    cache = _session_folder(tmp_path_factory) / "embedded-cache"
    cache.mkdir(exist_ok=True)
    return cache


@pytest.fixture
def embedded_cache(embedded_cache_dir, monkeypatch) -> Path:
    """``embedded_cache_dir`` as this test's GAINSURGERY_CACHE."""
    monkeypatch.setenv("GAINSURGERY_CACHE", str(embedded_cache_dir))
    return embedded_cache_dir


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


def fingerprinted(base: Path, method: str = "gain", seed: int = 0, **meta) -> GainFile:
    """A gain as train records it: random values around 1 and the base's tensor fingerprint."""
    g = random_gain(base, method, seed=seed)
    g.metadata["base_tensors_sha256"] = base_tensors_sha256(open_checkpoint(base), g.vectors)
    g.metadata.update(meta)
    return g


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
