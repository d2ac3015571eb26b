"""GGUF tensor types: their block scales, the exact fold, re-quantization, and their own rounding error.

Every ggml block type stores, per block of 32 or 256 weights, one or two float16
scales and small integers: a weight is ``a * (L - z) - c``, where ``a`` (the
sub-block's step) and ``c`` (its offset) are built from the f16 fields ``d`` (and
``dmin``/``m``) and, for the K-quants, small integer sub-scales. Every such weight
is *linear in the block's f16 fields*: multiply ``d`` (and ``dmin``/``m``) by ``s``
and the whole block is multiplied by ``s`` — the integers stay as they are. That is
the **fold**: a per-row gain (one value per block row) applied exactly, the only
error being the float16 rounding of the new scales (:func:`fold_rows`).
:data:`SCALE_FIELDS` says where those fields are in each block type.

A per-column gain varies inside a block and cannot be folded. Such a tensor is
**re-quantized** (:func:`encode`): for the types the ``gguf`` library quantizes
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and the float types) with the library's quantizer;
for the K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), which the library only
dequantizes, with the numpy quantizers below, written after llama.cpp's reference
ones (``make_qkx2_quants`` for the affine Q2_K/Q4_K/Q5_K, a weighted scale search
like ``make_qx_quants`` for the symmetric Q3_K/Q6_K, then the super-block scales
quantized to 4, 6 or 8 bits and every level rounded again with the final scales).
When the base tensor had the same type, each block also tries its *own old scales*
with the levels rounded again for the new values, and keeps whichever of the two
encodings is closer to the target (so re-quantizing an unchanged block gives it back
bit for bit). Everything is deterministic numpy: ``verify`` recomputes the bytes.

:func:`own_error` estimates a quantized tensor's own rounding error from its steps
(uniform rounding: RMS = step / sqrt(12)), the yardstick the per-tensor report
puts next to the error a route adds.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np

#: Elements per K-quant super-block.
QK_K = 256

#: Byte offsets, inside one block, of the float16 fields a block's weights are linear in
#: (``d``, and ``m``/``dmin`` where the type has them). Folding scales exactly these.
SCALE_FIELDS: dict[str, tuple[int, ...]] = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_NL": (0,), "IQ4_XS": (0,), "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,),
    "IQ3_XXS": (0,), "IQ3_S": (0,), "IQ1_S": (0,), "TQ1_0": (52,), "TQ2_0": (64,),
}
#: Why the other block types cannot be folded.
NOT_FOLDABLE = {
    "MXFP4": "its block scale is a power of two (E8M0), not a float16",
    "NVFP4": "its block scales are FP8 values, not float16",
    "IQ1_M": "its block scale is spread over the sub-scale bits, not a float16 field",
}
#: Float tensor types: scaled in float32 and rounded once, like safetensors tensors.
FLOAT_TYPES = ("F32", "F16", "BF16")
#: Bits per weight of the types a re-quantized tensor may be promoted to, in promotion order.
PROMOTION_LADDER_K = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16", "F32")
PROMOTION_LADDER_32 = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "F32")


def bits_per_weight(type_name: str) -> float:
    """Storage cost of a type, in bits per weight (block bytes * 8 / block elements)."""
    block, size = _sizes(type_name)
    return size * 8 / block


def _sizes(type_name: str) -> tuple[int, int]:
    from gainsurgery.formats.gguf.library import gguf_module

    gguf = gguf_module()
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]


def _qtype(type_name: str):  # noqa: ANN202 - a gguf enum member
    from gainsurgery.formats.gguf.library import gguf_module

    return gguf_module().GGMLQuantizationType[type_name]


def dequantize(raw: np.ndarray, type_name: str, ne0: int) -> np.ndarray:
    """Rows of raw tensor bytes (``(rows, row_bytes)`` uint8) as float32 ``(rows, ne0)``.

    The values are the ``gguf`` library's dequantization. For the types of :data:`CODECS`
    they are computed here, vectorized over the whole chunk (several times faster than the
    library's 16-row groups) with the library's own float32 operations in its order:
    ``tests/test_gguf_quants.py`` checks bit-for-bit equality with the library for each.
    """
    from gainsurgery.formats.gguf.library import gguf_module

    raw = np.ascontiguousarray(raw).reshape(-1, raw.shape[-1] if raw.ndim > 1 else raw.size)
    codec = CODECS.get(type_name)
    if codec is not None:
        size = _sizes(type_name)[1]
        params, levels = codec.unpack(raw.reshape(-1, size))
        return codec.values(params, levels).reshape(-1, ne0)
    gguf = gguf_module()
    if type_name == "F32":
        return raw.view("<f4").reshape(-1, ne0).astype(np.float32, copy=False)
    if type_name == "F16":
        return raw.view("<f2").reshape(-1, ne0).astype(np.float32)
    if type_name == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(-1, ne0)
    return np.asarray(gguf.quants.dequantize(raw, _qtype(type_name)), dtype=np.float32).reshape(-1, ne0)


# --------------------------------------------------------------------------------------------
# The fold: scale a block's float16 fields.


@dataclass
class Saturation:
    """Weights a route took out of range: finite that became ±inf, non-zero that became 0."""

    became_inf: int = 0
    became_zero: int = 0

    def add(self, other: Saturation) -> None:
        self.became_inf += other.became_inf
        self.became_zero += other.became_zero

    def __bool__(self) -> bool:
        return bool(self.became_inf or self.became_zero)


def fold_rows(raw: np.ndarray, type_name: str, row_scale: np.ndarray) -> tuple[np.ndarray, Saturation]:
    """Multiply each row of a quantized tensor by ``row_scale`` through its blocks' float16 fields.

    Args:
        raw: ``(rows, row_bytes)`` uint8, whole rows of blocks.
        type_name: a key of :data:`SCALE_FIELDS`.
        row_scale: ``(rows,)`` float32.

    Returns:
        The new bytes (a copy) and the saturation: each block whose finite field became
        ±inf counts its block's weights as ``became_inf``; one whose non-zero field became
        0 counts them as ``became_zero``.
    """
    block, size = _sizes(type_name)
    out = np.array(raw, dtype=np.uint8, copy=True)
    rows, row_bytes = out.shape
    per_row = row_bytes // size
    blocks = out.reshape(rows * per_row, size)
    scale = np.repeat(np.asarray(row_scale, dtype=np.float32), per_row)
    sat = Saturation()
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        for off in SCALE_FIELDS[type_name]:
            field = np.ascontiguousarray(blocks[:, off:off + 2]).view("<f2").reshape(-1)
            old = field.astype(np.float32)
            new = (old * scale).astype(np.float16)
            sat.became_inf += int(np.count_nonzero(np.isfinite(old) & ~np.isfinite(new))) * block
            sat.became_zero += int(np.count_nonzero((old != 0) & (new == 0))) * block
            blocks[:, off:off + 2] = new.astype("<f2").view(np.uint8).reshape(-1, 2)
    return out, sat


# --------------------------------------------------------------------------------------------
# Codecs: a block as (step a, offset c, zero point z, levels L): weight = a * (L - z) - c.


@dataclass
class Params:
    """The scales of a run of blocks, as stored (``fields``) and as steps/offsets per sub-block.

    ``a`` and ``c`` are ``(blocks, groups)`` float32; ``fields`` whatever :meth:`Codec.pack` needs.
    """

    fields: dict[str, np.ndarray]
    a: np.ndarray
    c: np.ndarray


class Codec:
    """One block type: unpack scales and levels, pack them, and find fresh scales."""

    name: str = ""
    block: int = 32
    group: int = 32      # weights per sub-block (one step a, one offset c)
    zero: int = 0        # z: weight = a * (L - z) - c
    lo: int = 0          # levels L run over [lo, hi]
    hi: int = 15

    def unpack(self, blocks: np.ndarray) -> tuple[Params, np.ndarray]:
        """(scales, levels ``(n, block)`` int32) of ``blocks`` (``(n, type_size)`` uint8)."""
        return self.scales(blocks), self.levels_of(blocks)

    def scales(self, blocks: np.ndarray) -> Params:
        """The scales of ``blocks`` alone (cheap: the levels are not unpacked)."""
        raise NotImplementedError

    def levels_of(self, blocks: np.ndarray) -> np.ndarray:
        """The levels ``(n, block)`` int32 of ``blocks``."""
        raise NotImplementedError

    def pack(self, params: Params, levels: np.ndarray) -> np.ndarray:
        """Blocks ``(n, type_size)`` uint8 from scales and levels."""
        raise NotImplementedError

    def fresh(self, x: np.ndarray) -> Params:
        """New scales for the weights ``x`` (``(n, block)`` float32)."""
        raise NotImplementedError

    def levels(self, x: np.ndarray, params: Params) -> np.ndarray:
        """The nearest levels for ``x`` under ``params``' steps (round half to even, clamped)."""
        n = x.shape[0]
        xg = x.reshape(n, -1, self.group)
        a = params.a[..., None]
        c = params.c[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.rint((xg + c) / a) + self.zero
        q = np.where(a == 0, self.zero, q)
        return np.clip(q, self.lo, self.hi).astype(np.int32).reshape(n, self.block)

    def values(self, params: Params, levels: np.ndarray) -> np.ndarray:
        """The weights the blocks hold, in the library's own float32 order of operations."""
        n = levels.shape[0]
        lg = (levels.reshape(n, -1, self.group) - self.zero).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # a saturated (infinite) scale: the library's inf/nan
            return (params.a[..., None] * lg - params.c[..., None]).reshape(n, self.block)

    def encode(self, x: np.ndarray, old: np.ndarray | None = None) -> np.ndarray:
        """Blocks for ``x``: fresh scales, or (per block, when closer) the ``old`` blocks' own scales."""
        params = self.fresh(x)
        lv = self.levels(x, params)
        out = self.pack(params, lv)
        if old is not None:
            kept = self.scales(old)
            lk = self.levels(x, kept)
            err_new = np.sum((self.values(params, lv) - x) ** 2, axis=1)
            err_old = np.sum((self.values(kept, lk) - x) ** 2, axis=1)
            use_old = err_old <= err_new
            if use_old.any():
                out[use_old] = self.pack(kept, lk)[use_old]
        return out


def _f16(values: np.ndarray) -> np.ndarray:
    """float32 -> float16 -> float32 (round to nearest even), as the stored field reads back."""
    with np.errstate(over="ignore"):
        return np.asarray(values, dtype=np.float32).astype(np.float16).astype(np.float32)


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(values, dtype=np.float32).astype("<f2").view(np.uint8).reshape(-1, 2)


def _read_f16(blocks: np.ndarray, off: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, off:off + 2]).view("<f2").reshape(-1).astype(np.float32)


def _nibbles_split(qs: np.ndarray, half: int) -> np.ndarray:
    """Levels from bytes whose low nibbles hold the first ``half`` levels and high nibbles the next."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int32)


def _nibbles_join(levels: np.ndarray, half: int) -> np.ndarray:
    lv = levels.astype(np.uint8)
    return (lv[..., :half] & 0x0F) | ((lv[..., half:] & 0x0F) << 4)


class _Simple32(Codec):
    """Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: one f16 step (and offset) per 32 weights; fresh scales from the library."""

    block = group = 32

    def __init__(self, name: str, zero: int, lo: int, hi: int, has_min: bool, high_bit: bool) -> None:
        self.name, self.zero, self.lo, self.hi = name, zero, lo, hi
        self.has_min, self.high_bit = has_min, high_bit

    def _layout(self) -> tuple[int, int]:
        """(offset of the 4-bit levels, offset of the high bits) in a block."""
        base = 4 if self.has_min else 2
        return (base + 4, base) if self.high_bit else (base, -1)

    def scales(self, blocks: np.ndarray) -> Params:
        d = _read_f16(blocks, 0)
        m = _read_f16(blocks, 2) if self.has_min else np.zeros_like(d)
        return Params({"d": d, "m": m}, d[:, None], -m[:, None])

    def levels_of(self, blocks: np.ndarray) -> np.ndarray:
        if self.name == "Q8_0":
            return blocks[:, 2:34].view(np.int8).astype(np.int32)
        ql_at, qh_at = self._layout()
        levels = _nibbles_split(blocks[:, ql_at:ql_at + 16], 16)
        if qh_at >= 0:
            qh = np.ascontiguousarray(blocks[:, qh_at:qh_at + 4]).view("<u4").reshape(-1, 1)
            levels |= (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int32)
        return levels

    def pack(self, params: Params, levels: np.ndarray) -> np.ndarray:
        parts = [_f16_bytes(params.fields["d"])]
        if self.has_min:
            parts.append(_f16_bytes(params.fields["m"]))
        if self.name == "Q8_0":
            parts.append(levels.astype(np.int8).view(np.uint8))
        else:
            if self.high_bit:
                bits = ((levels >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
                parts.append(np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4))
            parts.append(_nibbles_join(levels, 16))
        return np.concatenate(parts, axis=1)

    def fresh(self, x: np.ndarray) -> Params:
        from gainsurgery.formats.gguf.library import gguf_module

        blocks = np.asarray(gguf_module().quants.quantize(x.astype(np.float32), _qtype(self.name)))
        return self.scales(blocks.reshape(x.shape[0], -1))


def _affine_search(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                   nstep: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares (step, offset) per row of ``x`` with levels in [0, nmax], offset <= 0.

    llama.cpp's ``make_qkx2_quants``: try ``nstep + 1`` inverse steps around
    ``nmax / (max - min)``, solve the 2x2 least squares for each rounding, keep the best.
    Returns ``(step, mn)`` with weight ~= step * L - mn and mn >= 0.
    """
    xmin = np.minimum(x.min(axis=1), 0.0)
    xmax = x.max(axis=1)
    rng = xmax - xmin
    ok = rng > 0
    safe = np.where(ok, rng, 1.0)
    sum_w = w.sum(axis=1)
    sum_x = (w * x).sum(axis=1)
    shifted = x - xmin[:, None]

    def solve(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lv = np.clip(np.rint(iscale[:, None] * shifted), 0, nmax)
        sum_l = (w * lv).sum(axis=1)
        sum_l2 = (w * lv * lv).sum(axis=1)
        sum_xl = (w * lv * x).sum(axis=1)
        det = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            step = (sum_w * sum_xl - sum_x * sum_l) / det
            off = (sum_l2 * sum_x - sum_l * sum_xl) / det
            pos = off > 0
            step = np.where(pos, np.where(sum_l2 > 0, sum_xl / sum_l2, 0.0), step)
            off = np.where(pos, 0.0, off)
        err = (w * (step[:, None] * lv + off[:, None] - x) ** 2).sum(axis=1)
        return step, off, np.where(det > 0, err, np.inf)

    best_step = rng / nmax
    best_off = xmin.copy()
    lv = np.clip(np.rint(shifted * (nmax / safe)[:, None]), 0, nmax)
    best_err = (w * (best_step[:, None] * lv + best_off[:, None] - x) ** 2).sum(axis=1)
    for i in range(nstep + 1):
        step, off, err = solve((rmin + rdelta * i + nmax) / safe)
        better = ok & (err < best_err)
        best_step = np.where(better, step, best_step)
        best_off = np.where(better, off, best_off)
        best_err = np.where(better, err, best_err)
    best_step = np.where(ok, best_step, 0.0)
    return best_step.astype(np.float32), (-best_off).astype(np.float32)


def _symmetric_search(x: np.ndarray, nmax: int) -> np.ndarray:
    """Signed step per row of ``x`` for levels in [-nmax, nmax - 1], weights x^2 (``make_qx_quants``, rmse 1)."""
    idx = np.abs(x).argmax(axis=1)
    peak = x[np.arange(x.shape[0]), idx]
    ok = np.abs(peak) > 1e-30
    safe = np.where(ok, peak, 1.0)
    w = x * x
    best_metric = np.zeros(x.shape[0], dtype=np.float64)
    best_step = np.zeros(x.shape[0], dtype=np.float32)
    for k in [0, *range(-9, 10)]:
        iscale = -(nmax + 0.1 * k) / safe
        lv = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
        sumlx = (w * x * lv).sum(axis=1)
        suml2 = (w * lv * lv).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            metric = np.where(suml2 > 0, sumlx * sumlx / suml2, 0.0)
            step = np.where(suml2 > 0, sumlx / suml2, 0.0)
        better = ok & (metric > best_metric)
        best_metric = np.where(better, metric, best_metric)
        best_step = np.where(better, step, best_step).astype(np.float32)
    return best_step


def _quantize_scales(values: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative per-sub-block values as f16 ``d`` per super-block times integers in [0, top]."""
    peak = values.max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(peak > 0, top / peak, 0.0)
    ints = np.clip(np.rint(inv[:, None] * values), 0, top).astype(np.int32)
    return _f16(peak / top), ints


def _signed_scales(values: np.ndarray, top: float, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed per-sub-block steps as f16 ``d`` times integers in [lo, hi], the largest mapped to ``-top``."""
    idx = np.abs(values).argmax(axis=1)
    peak = values[np.arange(values.shape[0]), idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(peak != 0, -top / peak, 0.0)
        d = np.where(inv != 0, 1.0 / inv, 0.0)
    ints = np.clip(np.rint(inv[:, None] * values), lo, hi).astype(np.int32)
    return _f16(d), ints


def _pack_6bit_pairs(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes holding 8 six-bit scales and 8 six-bit mins (see gguf's ``get_scale_min``)."""
    sc = sc.astype(np.uint8)
    mn = mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _unpack_6bit_pairs(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d, m, md = raw[:, 0:4], raw[:, 4:8], raw[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc.astype(np.int32), mn.astype(np.int32)


def _bits2_split(qs: np.ndarray) -> np.ndarray:
    """2-bit levels of 256 weights from 64 bytes (Q2_K/Q3_K): weight 128h+32s+j in bits 2s of byte 32h+j."""
    n = qs.shape[0]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 256).astype(np.int32)


def _bits2_join(levels: np.ndarray) -> np.ndarray:
    n = levels.shape[0]
    lv = (levels.astype(np.uint8) & 3).reshape(n, 2, 4, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return np.bitwise_or.reduce(lv << shifts, axis=2).reshape(n, 64)


def _bit_planes_split(raw: np.ndarray) -> np.ndarray:
    """One bit per weight from 32 bytes (Q3_K's hmask, Q5_K's qh): weight 32b+j in bit b of byte j."""
    n = raw.shape[0]
    return ((raw.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).reshape(n, 256).astype(
        np.int32)


def _bit_planes_join(bits: np.ndarray) -> np.ndarray:
    n = bits.shape[0]
    b = (bits.astype(np.uint8) & 1).reshape(n, 8, 32) << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    return np.bitwise_or.reduce(b, axis=1)


def _nibbles_k_split(qs: np.ndarray) -> np.ndarray:
    """4-bit levels of 256 weights from 128 bytes (Q4_K/Q5_K): weight 64c+32h+j in nibble h of byte 32c+j."""
    n = qs.shape[0]
    return ((qs.reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F).reshape(
        n, 256).astype(np.int32)


def _nibbles_k_join(levels: np.ndarray) -> np.ndarray:
    n = levels.shape[0]
    lv = (levels.astype(np.uint8) & 0x0F).reshape(n, 4, 2, 32)
    return (lv[:, :, 0] | (lv[:, :, 1] << 4)).reshape(n, 128)


class _AffineK(Codec):
    """Q2_K, Q4_K, Q5_K: weight = d*sc*L - dmin*m, sub-scales and mins quantized per super-block."""

    block = QK_K

    def __init__(self, name: str) -> None:
        self.name = name
        self.group, self.hi, self.top = {"Q2_K": (16, 3, 15), "Q4_K": (32, 15, 63), "Q5_K": (32, 31, 63)}[name]
        # llama.cpp's search settings per type (make_qkx2_quants' rmin, rdelta, nstep).
        self.search = {"Q2_K": (-0.5, 0.1, 15), "Q4_K": (-1.0, 0.1, 20), "Q5_K": (-0.5, 0.1, 15)}[name]

    def _params(self, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, mn: np.ndarray) -> Params:
        return Params({"d": d, "dmin": dmin, "sc": sc, "mn": mn}, d[:, None] * sc.astype(np.float32),
                      dmin[:, None] * mn.astype(np.float32))

    def scales(self, blocks: np.ndarray) -> Params:
        if self.name == "Q2_K":
            scales = blocks[:, 0:16]
            return self._params(_read_f16(blocks, 80), _read_f16(blocks, 82), (scales & 0x0F).astype(np.int32),
                                (scales >> 4).astype(np.int32))
        sc, mn = _unpack_6bit_pairs(blocks[:, 4:16])
        return self._params(_read_f16(blocks, 0), _read_f16(blocks, 2), sc, mn)

    def levels_of(self, blocks: np.ndarray) -> np.ndarray:
        if self.name == "Q2_K":
            return _bits2_split(blocks[:, 16:80])
        if self.name == "Q4_K":
            return _nibbles_k_split(blocks[:, 16:144])
        return _nibbles_k_split(blocks[:, 48:176]) | (_bit_planes_split(blocks[:, 16:48]) << 4)

    def pack(self, params: Params, levels: np.ndarray) -> np.ndarray:
        f = params.fields
        d, dmin = _f16_bytes(f["d"]), _f16_bytes(f["dmin"])
        if self.name == "Q2_K":
            scales = (f["sc"].astype(np.uint8) & 0x0F) | ((f["mn"].astype(np.uint8) & 0x0F) << 4)
            return np.concatenate([scales, _bits2_join(levels), d, dmin], axis=1)
        scales = _pack_6bit_pairs(f["sc"], f["mn"])
        if self.name == "Q4_K":
            return np.concatenate([d, dmin, scales, _nibbles_k_join(levels)], axis=1)
        return np.concatenate([d, dmin, scales, _bit_planes_join(levels >> 4), _nibbles_k_join(levels)], axis=1)

    def fresh(self, x: np.ndarray) -> Params:
        n = x.shape[0]
        sub = x.reshape(-1, self.group)
        if self.name == "Q2_K":
            w = np.abs(sub)
        else:  # llama.cpp weighs each weight by av_x + |x|, av_x the sub-block's RMS
            w = np.sqrt((sub * sub).mean(axis=1, keepdims=True)) + np.abs(sub)
        step, mn = _affine_search(sub, w, self.hi, *self.search)
        d, sc = _quantize_scales(step.reshape(n, -1), self.top)
        dmin, mq = _quantize_scales(mn.reshape(n, -1), self.top)
        return self._params(d, dmin, sc, mq)


class _SymmetricK(Codec):
    """Q3_K, Q6_K: weight = d*sc*(L - z), signed sub-scales quantized per super-block."""

    block = QK_K
    group = 16

    def __init__(self, name: str) -> None:
        self.name = name
        # (levels z and range, sub-scale mapping of the largest to -top, stored range)
        self.zero, self.hi, self.nmax, self.top, self.slo, self.shi = {
            "Q3_K": (4, 7, 4, 32, -32, 31), "Q6_K": (32, 63, 32, 128, -128, 127)}[name]

    def _params(self, d: np.ndarray, sc: np.ndarray) -> Params:
        return Params({"d": d, "sc": sc}, d[:, None] * sc.astype(np.float32), np.zeros(sc.shape, np.float32))

    def scales(self, blocks: np.ndarray) -> Params:
        if self.name == "Q6_K":
            return self._params(_read_f16(blocks, 208), blocks[:, 192:208].view(np.int8).astype(np.int32))
        n = blocks.shape[0]
        raw = blocks[:, 96:108]
        low = ((raw[:, 0:8].reshape(n, 1, 8) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)) & 0x0F)
        high = ((raw[:, 8:12].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)) & 3)
        sc = (low.reshape(n, 16).astype(np.int32) | (high.reshape(n, 16).astype(np.int32) << 4)) - 32
        return self._params(_read_f16(blocks, 108), sc)

    def levels_of(self, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        if self.name == "Q6_K":
            ql, qh = blocks[:, 0:128], blocks[:, 128:192]
            low = ((ql.reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F)
            high = ((qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3)
            return low.reshape(n, 256).astype(np.int32) | (high.reshape(n, 256).astype(np.int32) << 4)
        return _bits2_split(blocks[:, 32:96]) | (_bit_planes_split(blocks[:, 0:32]) << 2)

    def pack(self, params: Params, levels: np.ndarray) -> np.ndarray:
        f = params.fields
        n = levels.shape[0]
        if self.name == "Q6_K":
            lv = levels.astype(np.uint8)
            low = (lv & 0x0F).reshape(n, 2, 2, 64)
            ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
            high = ((lv >> 4) & 3).reshape(n, 2, 4, 32) << np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
            qh = np.bitwise_or.reduce(high, axis=2).reshape(n, 64)
            return np.concatenate([ql, qh, f["sc"].astype(np.int8).view(np.uint8), _f16_bytes(f["d"])], axis=1)
        stored = (f["sc"] + 32).astype(np.uint8)
        raw = np.empty((n, 12), dtype=np.uint8)
        raw[:, 0:8] = (stored[:, 0:8] & 0x0F) | ((stored[:, 8:16] & 0x0F) << 4)
        hi2 = ((stored >> 4) & 3).reshape(n, 4, 4) << np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)
        raw[:, 8:12] = np.bitwise_or.reduce(hi2, axis=1)
        return np.concatenate([_bit_planes_join(levels >> 2), _bits2_join(levels), raw, _f16_bytes(f["d"])], axis=1)

    def fresh(self, x: np.ndarray) -> Params:
        n = x.shape[0]
        step = _symmetric_search(x.reshape(-1, self.group), self.nmax).reshape(n, -1)
        d, sc = _signed_scales(step, self.top, self.slo, self.shi)
        return self._params(d, sc)


CODECS: dict[str, Codec] = {
    "Q4_0": _Simple32("Q4_0", 8, 0, 15, has_min=False, high_bit=False),
    "Q4_1": _Simple32("Q4_1", 0, 0, 15, has_min=True, high_bit=False),
    "Q5_0": _Simple32("Q5_0", 16, 0, 31, has_min=False, high_bit=True),
    "Q5_1": _Simple32("Q5_1", 0, 0, 31, has_min=True, high_bit=True),
    "Q8_0": _Simple32("Q8_0", 0, -128, 127, has_min=False, high_bit=False),
    "Q2_K": _AffineK("Q2_K"), "Q4_K": _AffineK("Q4_K"), "Q5_K": _AffineK("Q5_K"),
    "Q3_K": _SymmetricK("Q3_K"), "Q6_K": _SymmetricK("Q6_K"),
}
#: Types whose quantizer lives in the ``gguf`` library (the rest of :data:`CODECS` are ours).
LIBRARY_QUANTIZERS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "MXFP4")


def can_encode(type_name: str) -> bool:
    """True when a tensor can be (re-)quantized to ``type_name`` here."""
    return type_name in CODECS or type_name in FLOAT_TYPES or type_name in LIBRARY_QUANTIZERS


def encode(values: np.ndarray, type_name: str, old: np.ndarray | None = None) -> tuple[np.ndarray, Saturation]:
    """Rows of float32 weights ``(rows, ne0)`` as raw ``type_name`` bytes ``(rows, row_bytes)``.

    ``old``: the base rows' bytes when they have this very type (each block may keep its
    old scales, see the module docstring). Float types round to nearest even; the
    saturation counts finite weights that became ±inf and non-zero ones that became 0.
    """
    rows, ne0 = values.shape
    sat = Saturation()
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        if type_name in FLOAT_TYPES:
            out = _round_float(values, type_name)
            back = dequantize(out, type_name, ne0)
        elif type_name in CODECS:
            codec = CODECS[type_name]
            x = values.reshape(-1, codec.block)
            prior = None if old is None else np.ascontiguousarray(old).reshape(x.shape[0], -1)
            out = codec.encode(x, prior).reshape(rows, -1)
            back = dequantize(out, type_name, ne0)
        else:
            from gainsurgery.formats.gguf.library import gguf_module

            out = np.asarray(gguf_module().quants.quantize(values, _qtype(type_name))).reshape(rows, -1)
            back = dequantize(out, type_name, ne0)
        sat.became_inf = int(np.count_nonzero(np.isfinite(values) & ~np.isfinite(back)))
        if type_name in FLOAT_TYPES:
            sat.became_zero = int(np.count_nonzero((values != 0) & (back == 0)))
        else:
            # Rounding small weights of a block to 0 is what quantizing does; a block whose
            # every weight became 0 although some were not (its scale underflowed) is saturation.
            block = _sizes(type_name)[0]
            dead = ~back.reshape(-1, block).any(axis=1)
            sat.became_zero = int(np.count_nonzero(values.reshape(-1, block)[dead]))
    return out, sat


def _round_float(values: np.ndarray, type_name: str) -> np.ndarray:
    """float32 rows -> raw bytes of F32, F16 or BF16, rounding to nearest even (like merge.kernel)."""
    v = np.ascontiguousarray(values, dtype=np.float32)
    if type_name == "F32":
        return v.view(np.uint8).reshape(v.shape[0], -1).copy()
    if type_name == "F16":
        return v.astype("<f2").view(np.uint8).reshape(v.shape[0], -1)
    bits = v.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    nan = np.isnan(v)
    if nan.any():  # a NaN stays a (quiet) NaN, never rounds into infinity
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype("<u2")
    return rounded.view(np.uint8).reshape(v.shape[0], -1)


def own_error(raw: np.ndarray, type_name: str) -> tuple[float, int] | None:
    """Sum over weights of step^2 / 12 (the uniform-rounding error^2) of quantized rows, and the weight count.

    None for types whose grid is not uniform steps (the IQ and ternary types) and for float types.
    """
    codec = CODECS.get(type_name)
    if codec is None:
        return None
    _, size = _sizes(type_name)
    blocks = np.ascontiguousarray(raw).reshape(-1, size)
    params = codec.scales(blocks)
    step2 = (params.a.astype(np.float64) ** 2).sum() * codec.group
    return float(step2 / 12.0), blocks.shape[0] * codec.block


def promotion_ladder(type_name: str, ne0: int) -> list[str]:
    """The types a re-quantized ``type_name`` tensor with rows of ``ne0`` weights may take, cheapest first.

    Its own type first (when it can be encoded here), then the standard types that cost
    more bits per weight and fit the row length (K-quants need rows of 256).
    """
    own_bits = bits_per_weight(type_name)
    ladder = PROMOTION_LADDER_K if ne0 % QK_K == 0 else PROMOTION_LADDER_32
    out = [type_name] if can_encode(type_name) else []
    for t in ladder:
        if t != type_name and bits_per_weight(t) > own_bits and t not in out:
            out.append(t)
    return out

