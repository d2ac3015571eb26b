"""From checkpoint tensor names to the modules of a model built in memory.

Gain file keys are the base checkpoint's tensor names; the model transformers
builds names its modules differently at times (``language_model.model.`` on
disk vs ``model.language_model.`` in memory, say). :func:`find_module` maps one
to the other. Which dim of a module's weight holds its input features comes
from the registry's layout (:func:`input_dim_of`), never from the module's
class: ``c_proj`` is a ``Conv1D`` in gpt2 but a ``Linear`` in gpt_bigcode.

Nothing here imports torch: it works on whatever ``named_modules()`` returns.
"""

from __future__ import annotations

from typing import Any, Mapping

from gainsurgery.architectures.registry import family_of
from gainsurgery.errors import ArchitectureError


def find_module(modules: Mapping[str, Any], key: str) -> tuple[str, Any]:
    """The module a checkpoint tensor name belongs to, matching by the longest unique suffix.

    Args:
        modules: ``dict(model.named_modules())``.
        key: a tensor name in the checkpoint (``...o_proj.weight``).

    Returns:
        (module name in memory, module).

    Raises:
        ArchitectureError: no module (or more than one) matches.
    """
    path = key.rsplit(".", 1)[0]
    if path in modules:
        return path, modules[path]
    parts = path.split(".")
    for start in range(1, len(parts)):
        suffix = ".".join(parts[start:])
        hits = [n for n in modules if n == suffix or n.endswith("." + suffix)]
        if len(hits) == 1:
            return hits[0], modules[hits[0]]
        if len(hits) > 1:
            break
    raise ArchitectureError(
        f"no unique module in the loaded model for gain key {key!r} "
        "(fused MoE experts cannot take hooks: apply the gain to the checkpoint instead)"
    )


def model_type_of_model(model: Any) -> str:
    """The ``model_type`` of an in-memory transformers (or PEFT-wrapped) model."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise ArchitectureError(f"{type(model).__name__} has no config.model_type; cannot tell its weight layout")
    return str(model_type)


def input_dim_of(model_type: str) -> int:
    """Which dim of a target weight holds its input features, from the registry's layout.

    Example:
        >>> input_dim_of("gpt2"), input_dim_of("gpt_bigcode")
        (0, 1)
    """
    return family_of(model_type).input_dim
