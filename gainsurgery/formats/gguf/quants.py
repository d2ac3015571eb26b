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
dequantizes, with our numpy quantizers (:mod:`.kquants`), written after llama.cpp's reference
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

from gainsurgery.formats.gguf.blocks import QK_K, Codec, Params, block_sizes, ggml_type
from gainsurgery.formats.gguf.kquants import AffineK, SymmetricK
from gainsurgery.formats.gguf.library import gguf_module
from gainsurgery.formats.gguf.simple_quants import Simple32

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

__all__ = ["CODECS", "FLOAT_TYPES", "LIBRARY_QUANTIZERS", "NOT_FOLDABLE", "PROMOTION_LADDER_32", "PROMOTION_LADDER_K",
           "QK_K", "SCALE_FIELDS", "Codec", "Params", "Saturation", "bits_per_weight", "block_sizes", "can_encode",
           "dequantize", "encode", "fold_rows", "own_error", "promotion_ladder"]


def bits_per_weight(type_name: str) -> float:
    """Storage cost of a type, in bits per weight (block bytes * 8 / block elements)."""
    block, size = block_sizes(type_name)
    return size * 8 / block


def dequantize(raw: np.ndarray, type_name: str, ne0: int) -> np.ndarray:
    """Rows of raw tensor bytes (``(rows, row_bytes)`` uint8) as float32 ``(rows, ne0)``.

    The values are the ``gguf`` library's dequantization. For the types of :data:`CODECS`
    they are computed here, vectorized over the whole chunk (several times faster than the
    library's 16-row groups) with the library's own float32 operations in its order:
    ``tests/test_gguf_quants.py`` checks bit-for-bit equality with the library for each.
    """
    raw = np.ascontiguousarray(raw).reshape(-1, raw.shape[-1] if raw.ndim > 1 else raw.size)
    codec = CODECS.get(type_name)
    if codec is not None:
        size = block_sizes(type_name)[1]
        params, levels = codec.unpack(raw.reshape(-1, size))
        return codec.values(params, levels).reshape(-1, ne0)
    gguf = gguf_module()
    if type_name == "F32":
        return raw.view("<f4").reshape(-1, ne0).astype(np.float32, copy=False)
    if type_name == "F16":
        return raw.view("<f2").reshape(-1, ne0).astype(np.float32)
    if type_name == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(-1, ne0)
    return np.asarray(gguf.quants.dequantize(raw, ggml_type(type_name)), dtype=np.float32).reshape(-1, ne0)


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
    block, size = block_sizes(type_name)
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
# Codecs: a block as (step a, offset c, zero point z, levels L): weight = a * (L - z) - c
# (:mod:`.blocks`), one per type of :mod:`.simple_quants` and :mod:`.kquants`.

CODECS: dict[str, Codec] = {
    "Q4_0": Simple32("Q4_0", 8, 0, 15, has_min=False, high_bit=False),
    "Q4_1": Simple32("Q4_1", 0, 0, 15, has_min=True, high_bit=False),
    "Q5_0": Simple32("Q5_0", 16, 0, 31, has_min=False, high_bit=True),
    "Q5_1": Simple32("Q5_1", 0, 0, 31, has_min=True, high_bit=True),
    "Q8_0": Simple32("Q8_0", 0, -128, 127, has_min=False, high_bit=False),
    "Q2_K": AffineK("Q2_K"), "Q4_K": AffineK("Q4_K"), "Q5_K": AffineK("Q5_K"),
    "Q3_K": SymmetricK("Q3_K"), "Q6_K": SymmetricK("Q6_K"),
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
            out = np.asarray(gguf_module().quants.quantize(values, ggml_type(type_name))).reshape(rows, -1)
            back = dequantize(out, type_name, ne0)
        sat.became_inf = int(np.count_nonzero(np.isfinite(values) & ~np.isfinite(back)))
        if type_name in FLOAT_TYPES:
            sat.became_zero = int(np.count_nonzero((values != 0) & (back == 0)))
        else:
            # Rounding small weights of a block to 0 is what quantizing does; a block whose
            # every weight became 0 although some were not (its scale underflowed) is saturation.
            block = block_sizes(type_name)[0]
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
    _, size = block_sizes(type_name)
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

