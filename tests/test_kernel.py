"""The scaling kernel against torch, bit for bit, including awkward values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gainsurgery.merge.kernel import Scratch, scale_array, scale_block, segments

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
BITS = {"BF16": torch.int16, "F16": torch.int16, "F32": torch.int32}


def reference(t: torch.Tensor, s: np.ndarray, dim: int) -> torch.Tensor:
    shape = [1] * t.dim()
    shape[dim] = -1
    return (t.float() * torch.from_numpy(s).reshape(shape)).to(t.dtype)


def run_kernel(t: torch.Tensor, s: np.ndarray, dim: int, dtype: str) -> torch.Tensor:
    raw = t.contiguous().view(BITS[dtype]).numpy().view({"BF16": "<u2", "F16": "<f2", "F32": "<f4"}[dtype])
    out = scale_array(raw, dtype, tuple(t.shape), dim, s)
    ints = out.view(np.int32 if dtype == "F32" else np.int16)
    return torch.from_numpy(ints).view(t.dtype).reshape(t.shape)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("shape,dim", [((7, 13), 1), ((7, 13), 0), ((3, 5, 4), 1), ((300, 1000), 1),
                                       ((1000, 300), 0), ((2, 3), 0)])
def test_kernel_matches_torch(dtype, shape, dim):
    gen = torch.Generator().manual_seed(0)
    t = (torch.randn(shape, generator=gen) * 3).to(TORCH[dtype])
    s = np.exp(np.random.default_rng(0).normal(0, 0.5, shape[dim])).astype(np.float32)
    got = run_kernel(t, s, dim, dtype)
    assert torch.equal(got.view(BITS[dtype]), reference(t, s, dim).view(BITS[dtype]))


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_kernel_rounding_edges(dtype):
    """Ties to even, overflow to inf, infinities, signed zeros, subnormals."""
    if dtype == "BF16":
        # Every bf16 bit pattern except NaNs, scaled by values that produce exact ties.
        bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
        t = bits.view(torch.bfloat16)
    else:
        bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
        t = bits.view(torch.float16)
    t = t[~torch.isnan(t.float())].reshape(-1, 1)
    for scale in (1.0, 1.5, 1.0 + 2**-8, 1.0 + 2**-9, 3.0, 0.75, 2.0**-20, 2.0**20, -1.25):
        s = np.array([scale], dtype=np.float32)
        got = run_kernel(t, s, 1, dtype)
        ref = reference(t, s, 1)
        mismatch = (got.view(torch.int16) != ref.view(torch.int16)).sum().item()
        assert mismatch == 0, f"scale {scale}: {mismatch} values differ"


def test_segments_cover_every_element_once():
    for shape, dim in [((5, 7), 1), ((5, 7), 0), ((4, 3, 6), 1), ((2, 2, 2, 9), 3), ((9, 2, 2), 0)]:
        for max_elems in (1, 3, 8, 1000):
            seen = np.zeros(int(np.prod(shape)), dtype=int)
            for seg in segments(shape, dim, max_elems):
                assert seg.rows * seg.cols == seg.stop - seg.start
                seen[seg.start:seg.stop] += 1
            assert (seen == 1).all(), (shape, dim, max_elems)


def test_tiny_blocks_give_same_result_as_one_block():
    rng = np.random.default_rng(1)
    t = torch.randn(6, 10).to(torch.bfloat16)
    s = rng.uniform(0.5, 2, 6).astype(np.float32)
    raw = t.view(torch.int16).numpy().view("<u2").reshape(-1)
    whole = raw.copy()
    for seg in segments((6, 10), 0, 1 << 20):
        scale_block(whole[seg.start:seg.stop], "BF16", seg, s, Scratch())
    pieces = raw.copy()
    for seg in segments((6, 10), 0, 3):  # splits rows into pieces of 3
        scale_block(pieces[seg.start:seg.stop], "BF16", seg, s, Scratch())
    assert (whole == pieces).all()
