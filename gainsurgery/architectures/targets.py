"""GAIN targets of a checkpoint: which of its tensors a method scales, along which dim.

:func:`resolve_targets` matches the registry's patterns (see
:mod:`gainsurgery.architectures.registry`) against a checkpoint's tensor names
and shapes, from headers alone. Everything downstream of a gain file is
architecture-agnostic: it only sees tensor names and dims.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from gainsurgery.architectures.registry import METHODS, SIDES, bias_key, family_of
from gainsurgery.errors import ArchitectureError


@dataclass(frozen=True)
class Target:
    """One tensor GAIN scales.

    Attributes:
        key: tensor name in the checkpoint (the gain file key).
        dim: dim of that tensor the vector runs along.
        length: vector length (size of ``dim``).
        kind: ``attn_out``, ``ffn_down``, or ``bias`` (output side only).
        layer: decoder layer index.
        layout: ``linear`` or ``conv1d``.
    """

    key: str
    dim: int
    length: int
    kind: str
    layer: int
    layout: str

    @property
    def module(self) -> str:
        """The module path in checkpoint naming (the key without ``.weight``/``.bias``)."""
        return self.key.rsplit(".", 1)[0]


def model_type_of(config: Mapping) -> str:
    """The ``model_type`` of a config dict, or a clear error when missing or unknown."""
    model_type = config.get("model_type")
    if not model_type:
        raise ArchitectureError("config.json has no 'model_type'; cannot tell which tensors GAIN adapts")
    if not isinstance(model_type, str):
        raise ArchitectureError(f"config.json: model_type must be a string, got {type(model_type).__name__}")
    family_of(model_type)  # unknown: a clear error naming the supported ones
    return model_type


def num_layers(config: Mapping) -> int | None:
    """Decoder layer count from a config dict (text config for multimodal models)."""
    text = config.get("text_config")
    for cfg in (config, text if isinstance(text, Mapping) else {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _shown(name: str) -> str:
    """A tensor name from a checkpoint's header, safe in a one-line message (escaped, bounded)."""
    return name if name.isprintable() and len(name) <= 200 else repr(name[:200])


def resolve_targets(
    shapes: Mapping[str, Sequence[int]],
    model_type: str,
    method: str = "gain-ffn",
    side: str = "in",
    expected_layers: int | None = None,
) -> list[Target]:
    """Find the tensors GAIN adapts among a checkpoint's tensor names.

    Args:
        shapes: every tensor name in the checkpoint -> its shape.
        model_type: transformers ``model_type`` (see :func:`supported_model_types`).
        method: ``gain`` (attention output projection) or ``gain-ffn`` (+ FFN down).
        side: ``in`` scales the projection's input features (W·diag(s), the
            default); ``out`` scales its outputs (diag(s)·W) and the bias too.
        expected_layers: when given, every layer must have exactly one attention
            output projection, which catches a registry that no longer matches.

    Returns:
        Targets in layer order.

    Raises:
        ArchitectureError: unknown model type/method/side, or names that do not match.

    Example:
        >>> shapes = {"model.layers.0.self_attn.o_proj.weight": (16, 32)}
        >>> [t.key for t in resolve_targets(shapes, "llama", "gain")]
        ['model.layers.0.self_attn.o_proj.weight']
    """
    if method not in METHODS:
        raise ArchitectureError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if side not in SIDES:
        raise ArchitectureError(f"unknown side {side!r}; choose 'in' or 'out'")
    family = family_of(model_type)
    kinds = ["attn_out"] + (["ffn_down"] if method == "gain-ffn" else [])
    excludes = [re.compile(p) for p in family.exclude]
    targets: list[Target] = []
    attn_layers: list[int] = []
    for kind in kinds:
        patterns = [re.compile(r"(?:^|\.)" + p + "$") for p in getattr(family, kind)]
        found = 0
        for name, shape in shapes.items():
            if any(e.search(name) for e in excludes):
                continue
            match = next((m for m in (p.search(name) for p in patterns) if m), None)
            if match is None:
                continue
            if len(shape) != 2:
                raise ArchitectureError(f"{_shown(name)}: expected a 2-D weight, found shape {tuple(shape)}")
            if len(match.group(1)) > 9:  # a hostile header's name; int() of 5,000 digits is a ValueError
                raise ArchitectureError(f"{_shown(name)}: layer number {match.group(1)[:12]}... is absurd")
            layer = int(match.group(1))
            found += 1
            if kind == "attn_out":
                attn_layers.append(layer)
            dim = family.input_dim if side == "in" else 1 - family.input_dim
            targets.append(Target(name, dim, int(shape[dim]), kind, layer, family.layout))
            bias = bias_key(name)
            if side == "out" and bias in shapes:
                out_size = int(shape[1 - family.input_dim])
                if tuple(shapes[bias]) != (out_size,):
                    raise ArchitectureError(
                        f"{_shown(bias)}: an output-side gain scales the bias with the weight's outputs, so it must be "
                        f"a 1-D bias of length {out_size}; found shape {list(shapes[bias])}")
                targets.append(Target(bias, 0, out_size, "bias", layer, family.layout))
        if not found:
            raise ArchitectureError(
                f"no {kind.replace('_', ' ')} tensors found for model_type {model_type!r} "
                f"(looked for names ending in {getattr(family, kind)[0]!r})"
            )
    # Never range(expected_layers) itself: config.json may claim 2**31 layers (a list of 2**31 ints).
    if expected_layers is not None and (len(attn_layers) != expected_layers
                                        or sorted(attn_layers) != list(range(len(attn_layers)))):
        raise ArchitectureError(
            f"expected one attention output projection per layer for {expected_layers} layers, "
            f"found layers {sorted(attn_layers)[:8]}..."
        )
    # Layer order; within a layer attention before FFN, each weight followed by its bias.
    order = {t.key: (t.layer, kinds.index(t.kind) if t.kind != "bias" else None, t.key) for t in targets}
    for t in targets:
        if t.kind == "bias":
            weight = order[t.key[: -len("bias")] + "weight"]  # the inverse of registry.bias_key
            order[t.key] = (weight[0], weight[1], weight[2] + "~")
    targets.sort(key=lambda t: order[t.key])
    return targets
