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
#: Bytes of tensor data read (scaled, or compared) per chunk unless told otherwise: bounds peak memory.
DEFAULT_CHUNK_BYTES = 64 << 20

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


@dataclass(frozen=True)
class _Limits:
    """Where a float32 product lands once rounded to a dtype, judged on its magnitude bits.

    ``zero``: magnitudes at or below it round to 0. ``inf``: finite magnitudes at or
    above it round to infinity. ``in_inf``: the dtype's own infinity (magnitude bits).
    """

    zero: int
    inf: int
    in_inf: int
    in_mask: int


_F32_INF = 0x7F800000
# bfloat16 rounds to nearest even on the dropped 16 bits: <= 0x8000 becomes 0;
# >= 0x7F7F8000 becomes 0x7F80 (inf). float16: |x| <= 2**-25 becomes 0 (a tie goes to
# the even 0), |x| >= 65520 becomes inf (the tie above 65504 goes to the even 0x7C00).
# float32: the product itself is what is stored.
LIMITS = {
    "BF16": _Limits(zero=0x00008000, inf=0x7F7F8000, in_inf=0x7F80, in_mask=0x7FFF),
    "F16": _Limits(zero=0x33000000, inf=0x477FF000, in_inf=0x7C00, in_mask=0x7FFF),
    "F32": _Limits(zero=0, inf=_F32_INF, in_inf=_F32_INF, in_mask=0x7FFFFFFF),
}


def scale_block(raw: np.ndarray, dtype: str, seg: Segment, vector: np.ndarray, scratch: Scratch) -> tuple[int, int]:
    """Scale ``raw`` (the segment's elements, viewed as ``NUMPY_DTYPES[dtype]``) in place.

    Returns ``(became_inf, became_zero)``: how many finite weights became ±inf and
    how many non-zero weights became 0 once rounded to ``dtype`` (saturation). The
    result is still the IEEE value the format defines; callers decide whether
    saturation is an error. Counting costs one masked min/max per block; the exact
    counts are taken only for blocks that may hold a zero or an infinity.
    """
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        return _scale_block(raw, dtype, seg, vector, scratch)


def _scale_block(raw: np.ndarray, dtype: str, seg: Segment, vector: np.ndarray,
                 scratch: Scratch) -> tuple[int, int]:
    scale = vector[seg.idx]
    scale = scale.reshape(-1, 1) if seg.per_row else scale.reshape(1, -1)
    m = raw.size
    scratch.ensure(m)
    w = scratch.a[:m]
    f = w.view(np.float32)
    if dtype == "BF16":
        np.left_shift(raw, 16, out=w, dtype=np.uint32)
    else:  # F16, F32: widen (F32: copy) so that raw still holds the input when counting
        np.copyto(f, raw)
    f2 = f.reshape(seg.rows, seg.cols)
    np.multiply(f2, scale, out=f2)
    counts = _saturation(raw, dtype, w, scratch.b[:m])
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
    return counts


def _saturation(raw: np.ndarray, dtype: str, w: np.ndarray, t: np.ndarray) -> tuple[int, int]:
    """(finite -> inf, non-zero -> 0) for the float32 products ``w`` (bits) of the inputs ``raw``.

    A finite non-zero gain maps inf to inf, NaN to NaN and 0 to 0, so the counts are
    (products that round to inf) - (inputs that were inf), and likewise for zero.
    """
    lim = LIMITS[dtype]
    np.bitwise_and(w, 0x7FFFFFFF, out=t)
    if t.min() > lim.zero and t.max() < lim.inf:  # the common case: nothing near either edge
        return 0, 0
    out_zero = int(np.count_nonzero(t <= lim.zero))
    out_inf = int(np.count_nonzero((t >= lim.inf) & (t <= _F32_INF)))
    bits = raw.view(np.uint16 if raw.itemsize == 2 else np.uint32) & lim.in_mask
    in_zero = int(np.count_nonzero(bits == 0))
    in_inf = int(np.count_nonzero(bits == lim.in_inf))
    return out_inf - in_inf, out_zero - in_zero

def saturation_message(name: str, dtype: str, became_inf: int, became_zero: int) -> str:
    """One line naming a tensor whose scaled weights left ``dtype``'s range (without the advice).

    Example:
        >>> saturation_message("h.0.mlp.c_proj.weight", "F16", 3, 0)[:60]
        'h.0.mlp.c_proj.weight: 3 finite weights became ±inf and 0 no'
    """
    return (f"{name}: {became_inf} finite weights became ±inf and {became_zero} non-zero weights became 0 once "
            f"scaled and rounded to {dtype} (the gains take them out of its range)")


def scale_array(values: np.ndarray, dtype: str, shape: tuple[int, ...], dim: int, vector: np.ndarray) -> np.ndarray:
    """Scale a whole tensor held in memory (flat raw view); returns a new array.

    A convenience for tests; the streaming path uses :func:`scale_block` on
    bounded chunks instead.
    """
    out = np.array(values, dtype=NUMPY_DTYPES[dtype], copy=True).reshape(-1)
    scratch = Scratch()
    for seg in segments(shape, dim):
        scale_block(out[seg.start:seg.stop], dtype, seg, vector, scratch)
    return out


def count_saturation(values: np.ndarray, dtype: str, shape: tuple[int, ...], dim: int,
                     vector: np.ndarray) -> tuple[int, int]:
    """``(became_inf, became_zero)`` for scaling a whole tensor held in memory (see :func:`scale_block`).

    Example:
        >>> w = np.array([60000.0, 1.0, 0.0, 1e-7], np.float16)
        >>> count_saturation(w, "F16", (4,), 0, np.array([2, 2, 2, 0.1], np.float32))
        (1, 1)
    """
    out = np.array(values, dtype=NUMPY_DTYPES[dtype], copy=True).reshape(-1)
    scratch = Scratch()
    inf = zero = 0
    for seg in segments(shape, dim):
        a, b = scale_block(out[seg.start:seg.stop], dtype, seg, vector, scratch)
        inf, zero = inf + a, zero + b
    return inf, zero
