"""The 32-weight block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (one f16 step, and offset, per block).

Their levels and scales are unpacked and packed here (vectorized over a whole chunk);
fresh scales come from the ``gguf`` library's own quantizer for each type.
"""

from __future__ import annotations

import numpy as np

from gainsurgery.formats.gguf.blocks import (Codec, Params, f16_bytes, ggml_type, nibbles_join, nibbles_split,
                                             read_f16)
from gainsurgery.formats.gguf.library import gguf_module


class Simple32(Codec):
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
        d = read_f16(blocks, 0)
        m = read_f16(blocks, 2) if self.has_min else np.zeros_like(d)
        return Params({"d": d, "m": m}, d[:, None], -m[:, None])

    def levels_of(self, blocks: np.ndarray) -> np.ndarray:
        if self.name == "Q8_0":
            return blocks[:, 2:34].view(np.int8).astype(np.int32)
        ql_at, qh_at = self._layout()
        levels = nibbles_split(blocks[:, ql_at:ql_at + 16], 16)
        if qh_at >= 0:
            qh = np.ascontiguousarray(blocks[:, qh_at:qh_at + 4]).view("<u4").reshape(-1, 1)
            levels |= (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int32)
        return levels

    def pack(self, params: Params, levels: np.ndarray) -> np.ndarray:
        parts = [f16_bytes(params.fields["d"])]
        if self.has_min:
            parts.append(f16_bytes(params.fields["m"]))
        if self.name == "Q8_0":
            parts.append(levels.astype(np.int8).view(np.uint8))
        else:
            if self.high_bit:
                bits = ((levels >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
                parts.append(np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4))
            parts.append(nibbles_join(levels, 16))
        return np.concatenate(parts, axis=1)

    def fresh(self, x: np.ndarray) -> Params:
        blocks = np.asarray(gguf_module().quants.quantize(x.astype(np.float32), ggml_type(self.name)))
        return self.scales(blocks.reshape(x.shape[0], -1))
