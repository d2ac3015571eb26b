"""The scaling kernel: T' = round_to(T.dtype, float32(T) · s broadcast along dim).

Works in place on raw little-endian tensor bytes, block by block, with numpy
only (no torch at import time). bfloat16 is the high half of a float32, so the
widening is a 16-bit shift and the narrowing is round-to-nearest-even on the
dropped half: the same result ``torch.Tensor.to(torch.bfloat16)`` gives for every
finite and infinite value. float16 goes through numpy's IEEE conversions, which
also round to nearest even.

The flat element ``e`` of a tensor of shape ``(..., n, post...)`` scaled along
dim ``d`` (size ``n``) gets ``s[(e // post) % n]`` where ``post`` is the product
of the sizes after ``d``. :func:`segments` cuts a tensor into blocks on which
that pattern is a simple broadcast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

#: Elements per compute block: 256K float32 = 1 MiB, small enough for L2 caches.
BLOCK_ELEMS = 1 << 18

NUMPY_DTYPES = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}


@dataclass(frozen=True)
class Segment:
    """A run of elements ``[start, stop)`` scaled by one broadcast.

    ``rows`` × ``cols`` == stop - start. The scale for the block reshaped to
    ``(rows, cols)`` is ``vector[idx]`` broadcast as ``scale_shape``: either a
    row vector (period along the last axis) or a column (one value per row).
    """

    start: int
    stop: int
    rows: int
    cols: int
    idx: slice | np.ndarray
    per_row: bool


def segments(shape: tuple[int, ...], dim: int, max_elems: int = BLOCK_ELEMS) -> Iterator[Segment]:
    """Cut a tensor of ``shape`` into blocks of at most about ``max_elems`` elements.

    Each block's scale pattern is a plain broadcast (see module docstring). A block
    exceeds ``max_elems`` only when one vector period alone is longer.
    """
    numel = math.prod(shape)
    n = shape[dim]
    post = math.prod(shape[dim + 1:])
    if numel == 0:
        return
    if post == 1:
        # The scale pattern repeats every n elements along the flat buffer.
        if n <= max_elems:
            rows_per = max(1, max_elems // n)
            total_rows = numel // n
            for r0 in range(0, total_rows, rows_per):
                r1 = min(total_rows, r0 + rows_per)
                yield Segment(r0 * n, r1 * n, r1 - r0, n, slice(0, n), per_row=False)
        else:
            for row_start in range(0, numel, n):
                for a in range(0, n, max_elems):
                    b = min(n, a + max_elems)
                    yield Segment(row_start + a, row_start + b, 1, b - a, slice(a, b), per_row=False)
    else:
        total_rows = numel // post
        if post <= max_elems:
            rows_per = max(1, max_elems // post)
            for r0 in range(0, total_rows, rows_per):
                r1 = min(total_rows, r0 + rows_per)
                idx = np.arange(r0, r1) % n
                yield Segment(r0 * post, r1 * post, r1 - r0, post, idx, per_row=True)
        else:
            for r in range(total_rows):
                for a in range(0, post, max_elems):
                    b = min(post, a + max_elems)
                    yield Segment(r * post + a, r * post + b, 1, b - a, np.array([r % n]), per_row=True)


class Scratch:
    """Reusable float32/uint32 work buffers for one thread (about 2 × 1 MiB)."""

    def __init__(self, elems: int = BLOCK_ELEMS) -> None:
        self.elems = elems
        self.a = np.empty(elems, dtype=np.uint32)
        self.b = np.empty(elems, dtype=np.uint32)

    def ensure(self, elems: int) -> None:
        if elems > self.elems:
            self.__init__(elems)


def scale_block(raw: np.ndarray, dtype: str, seg: Segment, vector: np.ndarray, scratch: Scratch) -> None:
    """Scale ``raw`` (the segment's elements, viewed as ``NUMPY_DTYPES[dtype]``) in place.

    Overflow to infinity is the IEEE result the format defines, not an error.
    """
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        _scale_block(raw, dtype, seg, vector, scratch)


def _scale_block(raw: np.ndarray, dtype: str, seg: Segment, vector: np.ndarray, scratch: Scratch) -> None:
    scale = vector[seg.idx]
    scale = scale.reshape(-1, 1) if seg.per_row else scale.reshape(1, -1)
    m = raw.size
    scratch.ensure(m)
    if dtype == "F32":
        np.multiply(raw.reshape(seg.rows, seg.cols), scale, out=raw.reshape(seg.rows, seg.cols))
        return
    w = scratch.a[:m]
    f = w.view(np.float32)
    if dtype == "BF16":
        np.left_shift(raw, 16, out=w, dtype=np.uint32)
    else:  # F16
        np.copyto(f, raw)
    f2 = f.reshape(seg.rows, seg.cols)
    np.multiply(f2, scale, out=f2)
    if dtype == "BF16":
        # Round to nearest even on the dropped low half, then keep the high half.
        t = scratch.b[:m]
        np.right_shift(w, 16, out=t)
        np.bitwise_and(t, 1, out=t)
        np.add(w, t, out=w)
        np.add(w, 0x7FFF, out=w)
        np.right_shift(w, 16, out=w)
        np.copyto(raw, w, casting="unsafe")
    else:
        np.copyto(raw, f, casting="same_kind")


def scale_array(values: np.ndarray, dtype: str, shape: tuple[int, ...], dim: int, vector: np.ndarray) -> np.ndarray:
    """Scale a whole tensor held in memory (flat raw view); returns a new array.

    A convenience for verification and tests; the streaming path uses
    :func:`scale_block` on bounded chunks instead.
    """
    out = np.array(values, dtype=NUMPY_DTYPES[dtype], copy=True).reshape(-1)
    scratch = Scratch()
    for seg in segments(shape, dim):
        scale_block(out[seg.start:seg.stop], dtype, seg, vector, scratch)
    return out
