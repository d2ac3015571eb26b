"""The block model every codec shares: a block as (step a, offset c, zero point z, levels L).

A weight of a block is ``a * (L - z) - c``: :class:`Codec` unpacks a block type's
scales (:class:`Params`) and levels, packs them back, finds fresh scales for new
weights and encodes, keeping a block's old scales where they fit better. The
families are beside it: :mod:`.simple_quants` (Q4_0 ... Q8_0, 32 weights a block)
and :mod:`.kquants` (Q2_K ... Q6_K, 256-weight super-blocks); the float16 field
helpers here are what both read and write their scales with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gainsurgery.formats.gguf.library import gguf_module

#: Elements per K-quant super-block.
QK_K = 256


def block_sizes(type_name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type, from the ``gguf`` library's table."""
    gguf = gguf_module()
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]


def ggml_type(type_name: str):  # noqa: ANN201 - a gguf enum member
    """The ``gguf`` library's enum member for a type name (``"Q4_K"``)."""
    return gguf_module().GGMLQuantizationType[type_name]


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


def f16(values: np.ndarray) -> np.ndarray:
    """float32 -> float16 -> float32 (round to nearest even), as the stored field reads back."""
    with np.errstate(over="ignore"):
        return np.asarray(values, dtype=np.float32).astype(np.float16).astype(np.float32)


def f16_bytes(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(values, dtype=np.float32).astype("<f2").view(np.uint8).reshape(-1, 2)


def read_f16(blocks: np.ndarray, off: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, off:off + 2]).view("<f2").reshape(-1).astype(np.float32)


def nibbles_split(qs: np.ndarray, half: int) -> np.ndarray:
    """Levels from bytes whose low nibbles hold the first ``half`` levels and high nibbles the next."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int32)


def nibbles_join(levels: np.ndarray, half: int) -> np.ndarray:
    lv = levels.astype(np.uint8)
    return (lv[..., :half] & 0x0F) | ((lv[..., half:] & 0x0F) << 4)
