"""The plan of a GGUF apply: which tensor takes which route, from the header alone.

:func:`make_plan` is pure: it maps every gain key to its GGUF tensor
(:mod:`.names`), multiplies the gains of a stack in float32, moves the column gains
that have an exact home onto that home's rows, and gives every touched tensor one
route:

``float``
    F32/F16/BF16: ``round(float32(W) * cols * rows)``, rounded once (round to nearest
    even), exactly as a safetensors tensor; ``verify`` compares bytes.
``fold``
    A quantized tensor scaled by rows only: each row's block scales (``d``, and
    ``dmin``/``m`` where the type has them) are multiplied; the quantized integers are
    untouched; the only error is the float16 rounding of the new scales.
``requantize``
    A quantized tensor scaled by columns that have no exact home (grouped-query
    attention's ``attn_output``): dequantized, scaled in float32, quantized again —
    to its own type when that adds at most ``tolerance`` times the gain's own change
    to the tensor (RMS), else to the cheapest type above it that does (see
    :func:`~gainsurgery.formats.gguf.quants.promotion_ladder`); with ``keep_types``
    always to its own type. The type is chosen when the tensor is measured
    (:mod:`.engine`), before anything is written.

A column gain that moves (``moved``) leaves its own tensor byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gainsurgery.errors import PlanError
from gainsurgery.formats.gguf.names import Move, NameMap
from gainsurgery.formats.gguf.opening import GGUFFile, TensorEntry
from gainsurgery.formats.gguf.quants import FLOAT_TYPES, NOT_FOLDABLE, SCALE_FIELDS, can_encode, promotion_ladder
from gainsurgery.gainfile import GainFile, check_values, natural_key

#: Default of ``tolerance``: a re-quantized tensor keeps its type when that adds at most this
#: fraction of the gain's own change to it (RMS over the tensor's weights).
DEFAULT_TOLERANCE = 0.1


@dataclass(frozen=True)
class GGUFOptions:
    """How quantized tensors are treated.

    Attributes:
        tolerance: the largest error re-quantizing may add, as a fraction of the RMS
            change the gain makes to that tensor; beyond it the tensor is promoted.
        keep_types: never promote: re-quantize to the tensor's own type whatever it costs.
        allow_negative: accept negative gains.
        allow_saturation: write weights (or block scales) that scaling takes out of range.
    """

    tolerance: float = DEFAULT_TOLERANCE
    keep_types: bool = False
    allow_negative: bool = False
    allow_saturation: bool = False

    def as_dict(self) -> dict[str, Any]:
        """What the provenance records (``verify`` reproduces the routes from it)."""
        return {"tolerance": self.tolerance, "keep_types": self.keep_types}


@dataclass
class TensorOp:
    """One GGUF tensor the apply rewrites.

    Attributes:
        entry: the tensor.
        route: ``float``, ``fold`` or ``requantize``.
        rows: per-row factors (length: rows) or None.
        cols: per-column factors (length ``ne[0]``) or None.
        keys: the gain keys that scale it (directly or through a move).
        note: why this route (a move's algebra, why no move exists).
        ladder: for ``requantize``, the types it may take, own type first.
    """

    entry: TensorEntry
    route: str
    rows: np.ndarray | None = None
    cols: np.ndarray | None = None
    keys: list[str] = field(default_factory=list)
    note: str = ""
    ladder: list[str] = field(default_factory=list)

    def target(self, base: np.ndarray, first_row: int) -> np.ndarray:
        """The exact float32 target for rows ``first_row...`` of the tensor, dequantized as ``base``."""
        out = np.array(base, dtype=np.float32, copy=True)
        if self.cols is not None:
            out *= self.cols[None, :]
        if self.rows is not None:
            out *= self.rows[first_row:first_row + out.shape[0], None]
        return out


@dataclass
class GGUFPlan:
    """What a GGUF apply will do; computed from the header alone.

    Attributes:
        base: the opened base file.
        names: its name map.
        gain: the stacked gain.
        sources: provenance of each gain file.
        options: how quantized tensors are treated.
        keys: gain key -> its GGUF tensor name.
        ops: GGUF tensor name -> its operation, in file order.
        moves: gain key -> the exact move its columns took.
        unmoved: gain key -> why its columns could not move (then its tensor is re-quantized).
    """

    base: GGUFFile
    names: NameMap
    gain: GainFile
    sources: list[dict[str, Any]]
    options: GGUFOptions
    keys: dict[str, str]
    ops: dict[str, TensorOp]
    moves: dict[str, Move]
    unmoved: dict[str, str]

    @property
    def bytes_rewritten(self) -> int:
        """Bytes of base tensor data the apply reads and rewrites (the rest is copied)."""
        return sum(op.entry.nbytes for op in self.ops.values())

    def routes(self) -> list[dict[str, Any]]:
        """One line per gain key: where it lands and how, for ``--dry-run`` and reports."""
        out = []
        for key in sorted(self.gain.vectors, key=natural_key):
            name = self.keys[key]
            entry = self.base.by_name[name]
            move = self.moves.get(key)
            if move is not None:
                onto = self.ops[move.onto]
                out.append({"key": key, "tensor": name, "type": entry.type_name, "route": "moved",
                            "onto": move.onto, "onto_type": onto.entry.type_name, "onto_route": onto.route,
                            "bias": move.bias, "why": move.why})
                continue
            op = self.ops[name]
            line = {"key": key, "tensor": name, "type": entry.type_name, "route": op.route, "why": op.note}
            if op.route == "requantize":
                line["ladder"] = op.ladder
            out.append(line)
        return out


def make_plan(g: GGUFFile, gain: GainFile, sources: list[dict[str, Any]] | None = None,
              options: GGUFOptions | None = None) -> GGUFPlan:
    """Match ``gain`` against the GGUF file ``g`` and route every touched tensor; nothing is read but the header.

    Raises:
        PlanError: a key with no GGUF tensor, a wrong dim or length, a tensor type no
            route handles, or values refused (zero, non-finite, negative without leave).
        ArchitectureError: an architecture the registry does not support as GGUF.
    """
    options = options or GGUFOptions()
    if not np.isfinite(options.tolerance) or options.tolerance < 0:
        raise PlanError(f"the re-quantization tolerance must be a finite number >= 0, got {options.tolerance}")
    split = g.number("split.count")
    if isinstance(split, int) and split > 1:
        raise PlanError(f"{g.name} is one part of a split GGUF ({split} parts); merge it first "
                        "(llama-gguf-split --merge) and apply to the merged file")
    names = NameMap(g)
    rows: dict[str, np.ndarray] = {}
    cols: dict[str, np.ndarray] = {}
    contributors: dict[str, list[str]] = {}
    keys: dict[str, str] = {}
    moves: dict[str, Move] = {}
    unmoved: dict[str, str] = {}
    notes: dict[str, str] = {}

    def scale(store: dict[str, np.ndarray], name: str, vector: np.ndarray, key: str) -> None:
        vector = np.asarray(vector, dtype=np.float32)
        store[name] = vector.copy() if name not in store else (store[name] * vector).astype(np.float32)
        contributors.setdefault(name, []).append(key)

    for key in sorted(gain.vectors, key=natural_key):
        vector, dim = gain.vectors[key], gain.dims[key]
        mapped = names.to_gguf(key)
        entry = mapped.entry
        keys[key] = entry.name
        shape = entry.shape
        if len(shape) > 2:
            raise PlanError(f"gain for {key!r} targets {entry.name!r}, a {len(shape)}-D tensor; gains apply to "
                            "matrices and vectors only")
        if dim >= len(shape):
            raise PlanError(f"gain for {key!r} runs along dim {dim}, but {entry.name!r} has only {len(shape)} dims")
        if shape[dim] != vector.size:
            raise PlanError(f"gain for {key!r} has length {vector.size}, but dim {dim} of {entry.name!r} has size "
                            f"{shape[dim]}")
        check_values(vector, key, allow_negative=options.allow_negative)
        _check_type(entry)
        along_rows = len(shape) == 2 and dim == 0
        if along_rows:
            scale(rows, entry.name, vector, key)
            continue
        if entry.type_name in FLOAT_TYPES:
            scale(cols, entry.name, vector, key)
            continue
        move, why = names.exact_move(mapped, vector)
        if move is not None:
            onto = g.by_name[move.onto]
            if onto.type_name not in FLOAT_TYPES and onto.type_name not in SCALE_FIELDS:
                move, why = None, (f"{move.onto} is {onto.type_name}, whose rows cannot be scaled exactly "
                                   f"({NOT_FOLDABLE.get(onto.type_name, 'no float16 block scale')})")
        if move is None:
            unmoved[key] = why
            notes.setdefault(entry.name, f"no exact move: {why}")
            scale(cols, entry.name, vector, key)
            continue
        _check_type(g.by_name[move.onto])
        moves[key] = move
        scale(rows, move.onto, move.rows, key)
        notes.setdefault(move.onto, f"takes {entry.name}'s column gain ({move.why})")
        if move.bias is not None:
            bias = g.by_name[move.bias]
            _check_type(bias)
            scale(cols, move.bias, move.rows, key)  # a 1-D bias runs along ne[0]
            notes.setdefault(move.bias, f"scaled with the rows of {move.onto}")

    ops: dict[str, TensorOp] = {}
    for entry in g.tensors:
        if entry.name not in rows and entry.name not in cols:
            continue
        r, c = rows.get(entry.name), cols.get(entry.name)
        if entry.type_name in FLOAT_TYPES:
            route, note = "float", notes.get(entry.name, "float tensor: scaled in float32, rounded once")
        elif c is None and entry.type_name in SCALE_FIELDS:
            route, note = "fold", notes.get(entry.name, "row gain: folded into the block scales")
        else:
            route = "requantize"
            note = notes.get(entry.name) or (
                f"{entry.type_name} has no float16 block scale to fold into "
                f"({NOT_FOLDABLE.get(entry.type_name, 'unknown layout')})" if c is None else "column gain")
        op = TensorOp(entry, route, r, c, contributors[entry.name], note)
        if route == "requantize":
            op.ladder = promotion_ladder(entry.type_name, entry.ne[0])
            if options.keep_types:
                if not can_encode(entry.type_name):
                    raise PlanError(f"{entry.name} ({entry.type_name}) must be re-quantized ({note}), and there is no "
                                    f"{entry.type_name} quantizer here; drop --keep-types to let it be promoted")
                op.ladder = [entry.type_name]
            if not op.ladder:
                raise PlanError(f"{entry.name} ({entry.type_name}) must be re-quantized ({note}), and no type can "
                                "hold its rows")
        ops[entry.name] = op
    return GGUFPlan(g, names, gain, list(sources or []), options, keys, ops, moves, unmoved)


def _check_type(entry: TensorEntry) -> None:
    """Refuse tensor types no route handles (integers, float64, types without a dequantizer)."""
    if entry.type_name in FLOAT_TYPES or entry.type_name in SCALE_FIELDS or entry.type_name in NOT_FOLDABLE \
            or can_encode(entry.type_name):
        return
    raise PlanError(f"{entry.name} is {entry.type_name}; gains are applied to float and quantized weight "
                    "tensors only")
