"""The K-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256-weight super-blocks of 16 or 32-weight sub-blocks).

The ``gguf`` library only dequantizes these, so their quantizers are here, in numpy,
written after llama.cpp's reference ones: ``make_qkx2_quants`` (a weighted
least-squares search of step and offset) for the affine Q2_K/Q4_K/Q5_K, a weighted
scale search like ``make_qx_quants`` for the symmetric Q3_K/Q6_K, then the
sub-block scales quantized to 4, 6 or 8 bits per super-block, and every level
rounded again with the final scales. The bit layouts (2-bit levels, bit planes,
K-nibbles, 6-bit scale pairs) follow the ``gguf`` library's dequantizers.
"""

from __future__ import annotations

import numpy as np

from gainsurgery.formats.gguf.blocks import QK_K, Codec, Params, f16, f16_bytes, read_f16


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
    return f16(peak / top), ints


def _signed_scales(values: np.ndarray, top: float, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed per-sub-block steps as f16 ``d`` times integers in [lo, hi], the largest mapped to ``-top``."""
    idx = np.abs(values).argmax(axis=1)
    peak = values[np.arange(values.shape[0]), idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(peak != 0, -top / peak, 0.0)
        d = np.where(inv != 0, 1.0 / inv, 0.0)
    ints = np.clip(np.rint(inv[:, None] * values), lo, hi).astype(np.int32)
    return f16(d), ints


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


class AffineK(Codec):
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
            return self._params(read_f16(blocks, 80), read_f16(blocks, 82), (scales & 0x0F).astype(np.int32),
                                (scales >> 4).astype(np.int32))
        sc, mn = _unpack_6bit_pairs(blocks[:, 4:16])
        return self._params(read_f16(blocks, 0), read_f16(blocks, 2), sc, mn)

    def levels_of(self, blocks: np.ndarray) -> np.ndarray:
        if self.name == "Q2_K":
            return _bits2_split(blocks[:, 16:80])
        if self.name == "Q4_K":
            return _nibbles_k_split(blocks[:, 16:144])
        return _nibbles_k_split(blocks[:, 48:176]) | (_bit_planes_split(blocks[:, 16:48]) << 4)

    def pack(self, params: Params, levels: np.ndarray) -> np.ndarray:
        f = params.fields
        d, dmin = f16_bytes(f["d"]), f16_bytes(f["dmin"])
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


class SymmetricK(Codec):
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
            return self._params(read_f16(blocks, 208), blocks[:, 192:208].view(np.int8).astype(np.int32))
        n = blocks.shape[0]
        raw = blocks[:, 96:108]
        low = ((raw[:, 0:8].reshape(n, 1, 8) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)) & 0x0F)
        high = ((raw[:, 8:12].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)) & 3)
        sc = (low.reshape(n, 16).astype(np.int32) | (high.reshape(n, 16).astype(np.int32) << 4)) - 32
        return self._params(read_f16(blocks, 108), sc)

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
            return np.concatenate([ql, qh, f["sc"].astype(np.int8).view(np.uint8), f16_bytes(f["d"])], axis=1)
        stored = (f["sc"] + 32).astype(np.uint8)
        raw = np.empty((n, 12), dtype=np.uint8)
        raw[:, 0:8] = (stored[:, 0:8] & 0x0F) | ((stored[:, 8:16] & 0x0F) << 4)
        hi2 = ((stored >> 4) & 3).reshape(n, 4, 4) << np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)
        raw[:, 8:12] = np.bitwise_or.reduce(hi2, axis=1)
        return np.concatenate([_bit_planes_join(levels >> 2), _bits2_join(levels), raw, f16_bytes(f["d"])], axis=1)

    def fresh(self, x: np.ndarray) -> Params:
        n = x.shape[0]
        step = _symmetric_search(x.reshape(-1, self.group), self.nmax).reshape(n, -1)
        d, sc = _signed_scales(step, self.top, self.slo, self.shi)
        return self._params(d, sc)
