"""Architecture registry: which tensors GAIN adapts, and how they are laid out.

Knowledge about model families is data (:data:`FAMILIES`), not if-chains. Each
family names regular expressions for the attention output projection and the FFN
down projection(s), matched as *suffixes* of the checkpoint's own tensor names,
so prefixes such as ``model.``, ``transformer.`` or ``model.language_model.`` are
found rather than guessed. Everything downstream of a gain file is
architecture-agnostic: it only sees tensor names and dims.

Layouts: ``nn.Linear`` stores ``[out, in]`` (input side is dim 1); GPT-2's
``Conv1D`` stores ``[in, out]`` (input side is dim 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from gainsurgery.errors import ArchitectureError

METHODS = ("gain", "gain-ffn")
SIDES = ("in", "out")

_LLAMA = {
    "layout": "linear",
    "attn_out": [r"layers\.(\d+)\.self_attn\.o_proj\.weight"],
    "ffn_down": [r"layers\.(\d+)\.mlp\.down_proj\.weight"],
}

#: family name -> layout, suffix patterns (group 1 = layer index), names to skip.
FAMILIES: dict[str, dict] = {
    "llama": _LLAMA,
    "gemma3": {**_LLAMA, "exclude": [r"vision_tower\.", r"multi_modal_projector\."]},
    "mixtral": {
        "layout": "linear",
        "attn_out": _LLAMA["attn_out"],
        "ffn_down": [r"layers\.(\d+)\.block_sparse_moe\.experts\.\d+\.w2\.weight"],
    },
    "qwen2_moe": {
        "layout": "linear",
        "attn_out": _LLAMA["attn_out"],
        "ffn_down": [
            r"layers\.(\d+)\.mlp\.experts\.\d+\.down_proj\.weight",
            r"layers\.(\d+)\.mlp\.shared_expert\.down_proj\.weight",
            r"layers\.(\d+)\.mlp\.down_proj\.weight",  # dense layers (mlp_only_layers)
        ],
    },
    "phi": {
        "layout": "linear",
        "attn_out": [r"layers\.(\d+)\.self_attn\.dense\.weight"],
        "ffn_down": [r"layers\.(\d+)\.mlp\.fc2\.weight"],
    },
    "gpt2": {
        "layout": "conv1d",
        "attn_out": [r"h\.(\d+)\.attn\.c_proj\.weight"],
        "ffn_down": [r"h\.(\d+)\.mlp\.c_proj\.weight"],
    },
    "gpt_bigcode": {
        "layout": "linear",
        "attn_out": [r"h\.(\d+)\.attn\.c_proj\.weight"],
        "ffn_down": [r"h\.(\d+)\.mlp\.c_proj\.weight"],
    },
    "gpt_neox": {
        "layout": "linear",
        "attn_out": [r"layers\.(\d+)\.attention\.dense\.weight"],
        "ffn_down": [r"layers\.(\d+)\.mlp\.dense_4h_to_h\.weight"],
    },
    "opt": {
        "layout": "linear",
        "attn_out": [r"layers\.(\d+)\.self_attn\.out_proj\.weight"],
        "ffn_down": [r"layers\.(\d+)\.fc2\.weight"],
    },
    "falcon": {
        "layout": "linear",
        "attn_out": [r"h\.(\d+)\.self_attention\.dense\.weight"],
        "ffn_down": [r"h\.(\d+)\.mlp\.dense_4h_to_h\.weight"],
    },
    "starcoder2": {
        "layout": "linear",
        "attn_out": _LLAMA["attn_out"],
        "ffn_down": [r"layers\.(\d+)\.mlp\.c_proj\.weight"],
    },
}

#: transformers ``model_type`` -> family in :data:`FAMILIES`.
MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "llama",
    "gemma2": "llama",
    "gemma3_text": "llama",
    "gemma3": "gemma3",
    "phi3": "llama",
    "phi": "phi",
    "gpt2": "gpt2",
    "gpt_bigcode": "gpt_bigcode",
    "gpt_neox": "gpt_neox",
    "opt": "opt",
    "falcon": "falcon",
    "bloom": "falcon",
    "starcoder2": "starcoder2",
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
}


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


def supported_model_types() -> list[str]:
    """Model types the registry knows, sorted."""
    return sorted(MODEL_TYPES)


def model_type_of(config: Mapping) -> str:
    """The ``model_type`` of a config dict, or a clear error when missing or unknown."""
    model_type = config.get("model_type")
    if not model_type:
        raise ArchitectureError("config.json has no 'model_type'; cannot tell which tensors GAIN adapts")
    if model_type not in MODEL_TYPES:
        raise ArchitectureError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    return str(model_type)


def num_layers(config: Mapping) -> int | None:
    """Decoder layer count from a config dict (text config for multimodal models)."""
    for cfg in (config, config.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            value = cfg.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


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
    if model_type not in MODEL_TYPES:
        raise ArchitectureError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    family = FAMILIES[MODEL_TYPES[model_type]]
    layout = family["layout"]
    kinds = ["attn_out"] + (["ffn_down"] if method == "gain-ffn" else [])
    excludes = [re.compile(p) for p in family.get("exclude", [])]
    targets: list[Target] = []
    attn_layers: list[int] = []
    for kind in kinds:
        patterns = [re.compile(r"(?:^|\.)" + p + "$") for p in family[kind]]
        found = 0
        for name, shape in shapes.items():
            if any(e.search(name) for e in excludes):
                continue
            match = next((m for m in (p.search(name) for p in patterns) if m), None)
            if match is None:
                continue
            if len(shape) != 2:
                raise ArchitectureError(f"{name}: expected a 2-D weight, found shape {tuple(shape)}")
            layer = int(match.group(1))
            found += 1
            if kind == "attn_out":
                attn_layers.append(layer)
            in_dim = 1 if layout == "linear" else 0
            dim = in_dim if side == "in" else 1 - in_dim
            targets.append(Target(name, dim, int(shape[dim]), kind, layer, layout))
            bias = name[: -len("weight")] + "bias"
            if side == "out" and bias in shapes:
                targets.append(Target(bias, 0, int(shapes[bias][0]), "bias", layer, layout))
        if not found:
            raise ArchitectureError(
                f"no {kind.replace('_', ' ')} tensors found for model_type {model_type!r} "
                f"(looked for names ending in {family[kind][0]!r})"
            )
    if expected_layers is not None and sorted(attn_layers) != list(range(expected_layers)):
        raise ArchitectureError(
            f"expected one attention output projection per layer for {expected_layers} layers, "
            f"found layers {sorted(attn_layers)[:8]}..."
        )
    # Layer order; within a layer attention before FFN, each weight followed by its bias.
    order = {t.key: (t.layer, kinds.index(t.kind) if t.kind != "bias" else None, t.key) for t in targets}
    for t in targets:
        if t.kind == "bias":
            weight = order[t.key[: -len("bias")] + "weight"]
            order[t.key] = (weight[0], weight[1], weight[2] + "~")
    targets.sort(key=lambda t: order[t.key])
    return targets
