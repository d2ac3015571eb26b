"""Gain keys (checkpoint tensor names) <-> GGUF tensor names, and what the architecture allows.

A gain file names tensors as the checkpoint does (``model.layers.3.mlp.down_proj.weight``);
a GGUF file names them as llama.cpp does (``blk.3.ffn_down.weight``). The map between
the two is the ``gguf`` library's own (``gguf.get_tensor_name_map`` for the file's
architecture and block count), never a table kept here. What the names do not say —
which transformers model a GGUF architecture is, whether its FFN is gated, whether each
head reads values nothing transforms, which tensors the converter stores otherwise —
is the architecture registry's :class:`~gainsurgery.architectures.registry.GGUFArch`.

Layout: GGUF stores a weight as rows of ``ne[0]`` input features, i.e. the checkpoint's
``[out, in]`` (``nn.Linear``), for every architecture of the registry: a gain along dim 1
scales columns, along dim 0 rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gainsurgery.architectures.registry import GGUFArch, family_of, gguf_arch
from gainsurgery.errors import ArchitectureError, PlanError
from gainsurgery.formats.gguf.library import gguf_module
from gainsurgery.formats.gguf.opening import GGUFFile, TensorEntry

_BLOCK_RE = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class Mapped:
    """Where a gain key lands in the GGUF file.

    Attributes:
        key: the gain key (checkpoint name).
        entry: the GGUF tensor.
        kind: its ``gguf.MODEL_TENSOR`` name (``FFN_DOWN``, ``ATTN_OUT``...).
        block: its block (layer) index, None outside the blocks.
    """

    key: str
    entry: TensorEntry
    kind: str
    block: int | None


@dataclass(frozen=True)
class Move:
    """A column gain moved exactly onto another tensor's rows.

    Attributes:
        source: the GGUF tensor whose columns the gain scales (left unchanged).
        onto: the GGUF tensor whose rows take it.
        bias: ``onto``'s bias, scaled by the same rows, if it has one.
        rows: the per-row factors for ``onto`` (float32).
        why: the algebra, for reports.
    """

    source: str
    onto: str
    bias: str | None
    rows: Any
    why: str


class NameMap:
    """The names and architecture facts of one opened GGUF file."""

    def __init__(self, g: GGUFFile) -> None:
        gguf = gguf_module()
        self.g = g
        self.arch_name = g.arch
        self.arch: GGUFArch = gguf_arch(self.arch_name)
        by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
        if self.arch_name not in by_name:
            raise ArchitectureError(f"the gguf library has no tensor-name map for architecture {self.arch_name!r}")
        self.model_arch = by_name[self.arch_name]
        blocks = g.number(f"{self.arch_name}.block_count")
        if not isinstance(blocks, int) or not 0 < blocks <= 1 << 16:
            raise ArchitectureError(f"{g.name}: {self.arch_name}.block_count is missing or not a layer count")
        self.blocks = blocks
        self.tmap = gguf.get_tensor_name_map(self.model_arch, blocks)
        self._gguf = gguf

    # -- heads ---------------------------------------------------------------------------

    def _per_block(self, key: str, default: list[int] | None) -> list[int] | None:
        values = self.g.numbers(f"{self.arch_name}.{key}")
        if values is None:
            return default
        if len(values) == 1:
            values = values * self.blocks
        if len(values) != self.blocks or not all(isinstance(v, int) and 0 <= v < 1 << 20 for v in values):
            raise ArchitectureError(f"{self.g.name}: {self.arch_name}.{key} is not one head count per layer")
        return [int(v) for v in values]

    def heads(self, block: int) -> tuple[int, int, int | None] | None:
        """(query heads, key/value heads, value head size) of a block, or None when the file does not say."""
        heads = self._per_block("attention.head_count", None)
        if heads is None:
            return None
        kv = self._per_block("attention.head_count_kv", heads)
        size = self.g.number(f"{self.arch_name}.attention.value_length")
        if not isinstance(size, int) or size <= 0:
            width = self.g.number(f"{self.arch_name}.embedding_length")
            size = width // heads[block] if isinstance(width, int) and heads[block] else None
        return heads[block], kv[block], size  # type: ignore[index]

    # -- names ---------------------------------------------------------------------------

    def gguf_name(self, kind: str, block: int | None, suffix: str = ".weight") -> str:
        """The GGUF name of a tensor kind (``FFN_UP``) in a block, by the library's name table."""
        template = self._gguf.TENSOR_NAMES[self._gguf.MODEL_TENSOR[kind]]
        return (template.format(bid=block) if block is not None else template) + suffix

    def to_gguf(self, key: str) -> Mapped:
        """Map a gain key to the file's tensor.

        Raises:
            PlanError: the library's map has no GGUF name for the key, the file holds no
                such tensor, or the converter stores it otherwise (see ``stored_otherwise``).
        """
        found = self.tmap.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise PlanError(f"gain key {key!r} has no GGUF tensor: the gguf library's name map for "
                            f"{self.arch_name} does not know it (was the gain made for another architecture?)")
        kind, name = found
        entry = self.g.by_name.get(name)
        if entry is None:
            raise PlanError(f"gain key {key!r} maps to {name!r}, which {self.g.name} does not hold")
        if kind.name in self.arch.stored_otherwise:
            raise PlanError(f"gain key {key!r} maps to {name!r}, which llama.cpp's converter stores differently "
                            f"from the checkpoint for {self.arch_name} ({kind.name}); a gain cannot be applied "
                            "to it as stored")
        m = _BLOCK_RE.match(name)
        return Mapped(key, entry, kind.name, int(m.group(1)) if m else None)

    def kind_of(self, entry: TensorEntry) -> tuple[str | None, int | None]:
        """(``MODEL_TENSOR`` name, block) of a GGUF tensor, by the library's map (None when it has none)."""
        m = _BLOCK_RE.match(entry.name)
        block = int(m.group(1)) if m else None
        stem, _, suffix = entry.name.rpartition(".")
        found = self.tmap.get_type_and_name(stem) if suffix in ("weight", "bias") else None
        return (found[0].name if found else None), block

    def checkpoint_name(self, entry: TensorEntry, kind: str) -> str:
        """The checkpoint name (gain key) transformers gives this GGUF tensor, for a GAIN target kind.

        Among the library's many checkpoint spellings of the tensor, the one that the
        registry's patterns for the transformers model type (``attn_out``/``ffn_down``) match,
        prefixed the way transformers names decoder layers (``model.layers.N``).

        Raises:
            ArchitectureError: none or several spellings fit.
        """
        family = family_of(self.arch.model_type)
        # transformers' decoder-only models name their layers model.layers.N.
        patterns = [re.compile(r"model\." + p) for p in getattr(family, kind)]
        stem = entry.name[: -len(".weight")]
        candidates = sorted({hf + ".weight" for hf, (_, name) in self.tmap.mapping.items()
                             if name == stem and hf.startswith("model.layers.")})
        fits = [c for c in candidates if any(p.fullmatch(c) for p in patterns)]
        if len(fits) != 1:
            raise ArchitectureError(f"{entry.name}: cannot tell its checkpoint name for {self.arch.model_type} "
                                    f"(candidates: {fits or candidates[:4]})")
        return fits[0]

    # -- exact moves ---------------------------------------------------------------------

    def exact_move(self, mapped: Mapped, cols: Any) -> tuple[Move | None, str]:
        """The exact home of a column gain on a quantized tensor: another tensor's rows, or why none.

        - ``ffn_down`` column i == ``ffn_up`` row i, in a gated FFN (the block has ``ffn_gate``
          and ``ffn_up`` has one row per column of ``ffn_down``);
        - ``attn_output`` column j == row j of the values, when every query head sharing a
          key/value head has the same gain there (always true without grouped-query
          attention): the values' rows are per key/value head.

        Returns ``(move, "")`` or ``(None, reason)``. Whether the target tensor can take
        the rows (a float16 block scale to fold into) is the caller's question.
        """
        import numpy as np

        entry, block = mapped.entry, mapped.block
        if block is None or mapped.kind not in ("FFN_DOWN", "ATTN_OUT") or len(entry.ne) != 2:
            return None, "no other tensor holds the same features"
        if mapped.kind == "FFN_DOWN":
            if not self.arch.gated_ffn:
                return None, f"{self.arch_name}'s FFN is not gated (no exact move through the activation)"
            up, gate = self.gguf_name("FFN_UP", block), self.gguf_name("FFN_GATE", block)
            if gate not in self.g.by_name or up not in self.g.by_name:
                return None, "the block has no separate ffn_gate and ffn_up (fused or not gated)"
            target = self.g.by_name[up]
            if target.shape[0] != entry.ne[0] or len(target.ne) != 2:
                return None, f"{up} does not have one row per column of {entry.name}"
            rows = np.asarray(cols, dtype=np.float32)
            why = f"gated FFN: column i of {entry.name} and row i of {up} scale the same feature"
            return Move(entry.name, up, _bias_of(self.g, up), rows, why), ""
        if not self.arch.plain_values:
            return None, f"{self.arch_name} transforms the values between attn_v and attn_output"
        v = self.gguf_name("ATTN_V", block)
        if v not in self.g.by_name:
            return None, "the block has no separate attn_v (fused q/k/v)"
        heads = self.heads(block)
        if heads is None or heads[2] is None:
            return None, "the file does not say its head counts"
        n_head, n_kv, size = heads
        target = self.g.by_name[v]
        if not n_kv or n_head % n_kv or entry.ne[0] != n_head * size or target.shape[0] != n_kv * size:
            return None, f"{entry.name} and {v} do not have the head layout the metadata says"
        per = n_head // n_kv
        grouped = np.asarray(cols, dtype=np.float32).reshape(n_kv, per, size)
        if per > 1 and not np.all(grouped == grouped[:, :1, :]):
            return None, (f"grouped-query attention: {per} query heads share each value head of {v}, and the "
                          "gain differs between them")
        rows = np.ascontiguousarray(grouped[:, 0, :]).reshape(-1)
        why = (f"attention: column j of {entry.name} and row j of {v} scale the same value feature"
               + (f" (the {per} query heads of each group carry equal gains)" if per > 1 else ""))
        return Move(entry.name, v, _bias_of(self.g, v), rows, why), ""


def _bias_of(g: GGUFFile, weight: str) -> str | None:
    name = weight[: -len(".weight")] + ".bias"
    return name if name in g.by_name else None
