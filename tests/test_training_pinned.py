"""Today's numbers, pinned: single-process float32 training must not change.

The forgetting experiment compares runs made months apart; a refactor of the
loop (sharding, streaming, mixed precision, checkpoints) must give the same
losses and gains for the same seed, data and options. The values below were
computed with the loop as it was before issue 11 (commit 1822d84) on the tiny
llama of ``tests/models.py``; the tolerance covers float32 summation order
across BLAS builds and thread counts, nothing more.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gainsurgery.gainfile import load
from gainsurgery.training import TrainConfig, train
from models import TEXT_A, save_tiny_lm, write_domain

PINNED_LOSSES = {
    "gain-ffn": [4.880331516265869, 4.905192852020264, 4.870822906494141],
    "lora": [4.880331516265869, 4.821288585662842, 4.784660816192627],
}
PINNED_GAIN_SUMS = {
    "model.layers.0.mlp.down_proj.weight": 63.60728448629379,
    "model.layers.0.self_attn.o_proj.weight": 31.921288311481476,
    "model.layers.1.mlp.down_proj.weight": 64.09846103191376,
    "model.layers.1.self_attn.o_proj.weight": 32.041547417640686,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pinned")
    return save_tiny_lm(root / "base", "llama"), write_domain(root, "legal", TEXT_A)


@pytest.mark.parametrize("method", ["gain-ffn", "lora"])
def test_single_process_float32_numbers_are_unchanged(method, tiny, tmp_path):
    base, data = tiny
    out = tmp_path / ("g.safetensors" if method == "gain-ffn" else "adapter")
    result = train(TrainConfig(base=str(base), data=[str(data)], output=str(out), method=method, steps=3,
                               batch_size=4, seq_len=32, lr=0.05, seed=0, progress=False,
                               log=str(tmp_path / "log.jsonl")))
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    np.testing.assert_allclose(losses, PINNED_LOSSES[method], rtol=2e-6, atol=0)
    assert result.final_loss == pytest.approx(PINNED_LOSSES[method][-1], rel=2e-6)
    if method == "gain-ffn":
        gains = load(out)
        sums = {k: float(v.astype(np.float64).sum()) for k, v in gains.vectors.items()}
        assert sorted(sums) == sorted(PINNED_GAIN_SUMS)
        for key, total in PINNED_GAIN_SUMS.items():
            assert sums[key] == pytest.approx(total, rel=1e-6), key
