"""The architecture registry: which tensors GAIN adapts, and how they are laid out.

Knowledge about model families is typed data (:data:`FAMILIES`), not if-chains.
Each :class:`Family` names regular expressions for the attention output
projection and the FFN down projection(s), matched as *suffixes* of the
checkpoint's own tensor names, so prefixes such as ``model.``, ``transformer.``
or ``model.language_model.`` are found rather than guessed.

The family's ``layout`` is the one source of truth for which dim of a weight
holds its input features: ``nn.Linear`` stores ``[out, in]`` (input side is dim
1); GPT-2's ``Conv1D`` stores ``[in, out]`` (input side is dim 0). Target
resolution, the forward hooks and the PEFT interop all read it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from gainsurgery.errors import ArchitectureError

#: GAIN methods: ``gain`` adapts the attention output projection, ``gain-ffn`` also the FFN down projection.
METHODS = ("gain", "gain-ffn")
#: ``in``: W·diag(s), the paper's default; ``out``: diag(s)·W, bias scaled too (an experiment).
SIDES = ("in", "out")
#: Weight layout -> the dim of the stored weight that holds the input features.
INPUT_DIM = {"linear": 1, "conv1d": 0}


@dataclass(frozen=True)
class Family:
    """One model family's GAIN targets.

    Attributes:
        layout: ``linear`` (weights ``[out, in]``) or ``conv1d`` (GPT-2, ``[in, out]``).
        attn_out: suffix patterns of attention output projection weights; group 1 is the layer index.
        ffn_down: suffix patterns of FFN down projection weights (per expert for MoE); group 1 is the layer.
        exclude: patterns of tensor names that are never targets (e.g. a vision tower).
    """

    layout: str
    attn_out: tuple[str, ...]
    ffn_down: tuple[str, ...]
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.layout not in INPUT_DIM:
            raise ValueError(f"unknown layout {self.layout!r}")  # a bug in the registry

    @property
    def input_dim(self) -> int:
        """The dim of a target weight that holds its input features."""
        return INPUT_DIM[self.layout]


_LLAMA_ATTN = (r"layers\.(\d+)\.self_attn\.o_proj\.weight",)
_LLAMA = Family("linear", _LLAMA_ATTN, (r"layers\.(\d+)\.mlp\.down_proj\.weight",))

#: family name -> its targets.
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "gemma3": Family("linear", _LLAMA.attn_out, _LLAMA.ffn_down,
                     exclude=(r"vision_tower\.", r"multi_modal_projector\.")),
    "mixtral": Family("linear", _LLAMA_ATTN, (r"layers\.(\d+)\.block_sparse_moe\.experts\.\d+\.w2\.weight",)),
    "qwen2_moe": Family("linear", _LLAMA_ATTN, (
        r"layers\.(\d+)\.mlp\.experts\.\d+\.down_proj\.weight",
        r"layers\.(\d+)\.mlp\.shared_expert\.down_proj\.weight",
        r"layers\.(\d+)\.mlp\.down_proj\.weight",  # dense layers (mlp_only_layers)
    )),
    "phi": Family("linear", (r"layers\.(\d+)\.self_attn\.dense\.weight",), (r"layers\.(\d+)\.mlp\.fc2\.weight",)),
    "gpt2": Family("conv1d", (r"h\.(\d+)\.attn\.c_proj\.weight",), (r"h\.(\d+)\.mlp\.c_proj\.weight",)),
    "gpt_bigcode": Family("linear", (r"h\.(\d+)\.attn\.c_proj\.weight",), (r"h\.(\d+)\.mlp\.c_proj\.weight",)),
    "gpt_neox": Family("linear", (r"layers\.(\d+)\.attention\.dense\.weight",),
                       (r"layers\.(\d+)\.mlp\.dense_4h_to_h\.weight",)),
    "opt": Family("linear", (r"layers\.(\d+)\.self_attn\.out_proj\.weight",), (r"layers\.(\d+)\.fc2\.weight",)),
    "falcon": Family("linear", (r"h\.(\d+)\.self_attention\.dense\.weight",),
                     (r"h\.(\d+)\.mlp\.dense_4h_to_h\.weight",)),
    "starcoder2": Family("linear", _LLAMA_ATTN, (r"layers\.(\d+)\.mlp\.c_proj\.weight",)),
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
class GGUFArch:
    """What gain surgery needs to know about one GGUF architecture (``general.architecture``).

    Tensor *names* come from the ``gguf`` library's own map for the architecture; this
    is what the names do not say.

    Attributes:
        model_type: the transformers ``model_type`` of the model transformers builds from
            such a file (its family gives the layout and the GAIN targets' names).
        gated_ffn: the FFN is ``down(act(gate(x)) * up(x))`` with nothing between, so
            column i of ``ffn_down`` and row i of ``ffn_up`` scale the same feature.
        plain_values: attention is ``o_proj(softmax(QK^T) V)`` with ``V = v_proj(x) (+ b)``
            and nothing between (no norm on V), so column j of ``attn_output`` and row j of
            a head's own ``attn_v`` scale the same feature.
        stored_otherwise: GGUF tensor kinds (``gguf.MODEL_TENSOR`` names) that llama.cpp's
            converter stores differently from the checkpoint (Gemma's norms as 1 + w,
            llama's q/k rows permuted): a gain cannot be applied to them as they are stored.
    """

    model_type: str
    gated_ffn: bool = True
    plain_values: bool = True
    stored_otherwise: tuple[str, ...] = ()


_GEMMA_NORMS = ("ATTN_NORM", "ATTN_POST_NORM", "FFN_NORM", "FFN_PRE_NORM", "FFN_POST_NORM", "OUTPUT_NORM",
                "ATTN_Q_NORM", "ATTN_K_NORM")
#: GGUF ``general.architecture`` -> :class:`GGUFArch`, for the architectures gains apply to as GGUF.
GGUF_ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", stored_otherwise=("ATTN_Q", "ATTN_K")),
    "qwen2": GGUFArch("qwen2"),
    "qwen3": GGUFArch("qwen3"),
    "gemma": GGUFArch("gemma", stored_otherwise=_GEMMA_NORMS),
    "gemma2": GGUFArch("gemma2", stored_otherwise=_GEMMA_NORMS),
    "gemma3": GGUFArch("gemma3_text", stored_otherwise=_GEMMA_NORMS),
    "phi3": GGUFArch("phi3"),
    "starcoder2": GGUFArch("starcoder2", gated_ffn=False),
}


def gguf_arch(name: str) -> GGUFArch:
    """The :class:`GGUFArch` of a GGUF ``general.architecture``.

    Raises:
        ArchitectureError: an architecture gains are not applied to as GGUF (yet).
    """
    found = GGUF_ARCHS.get(name)
    if found is None:
        raise ArchitectureError(f"GGUF architecture {name!r} is not supported; supported: "
                                f"{', '.join(sorted(GGUF_ARCHS))}")
    return found


def supported_model_types() -> list[str]:
    """Model types the registry knows, sorted.

    Example:
        >>> "llama" in supported_model_types()
        True
    """
    return sorted(MODEL_TYPES)


def family_of(model_type: str) -> Family:
    """The :class:`Family` of a transformers ``model_type``.

    Raises:
        ArchitectureError: the model type is not in the registry.
    """
    if model_type not in MODEL_TYPES:
        raise ArchitectureError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    return FAMILIES[MODEL_TYPES[model_type]]


def bias_key(weight_key: str) -> str | None:
    """The checkpoint name of the bias that belongs to ``weight_key``, or None if it names no weight.

    Output-side gains (diag(s)·W) scale the bias with the same vector, stored
    under this key in a gain file.

    Example:
        >>> bias_key("h.0.attn.c_proj.weight")
        'h.0.attn.c_proj.bias'
    """
    if not weight_key.endswith(".weight"):
        return None
    return weight_key[: -len("weight")] + "bias"
