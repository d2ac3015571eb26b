"""Gains on an in-memory transformers model: forward hooks instead of a merge.

Used to evaluate a gain file without writing a merged checkpoint, and as the
reference the merged checkpoints are tested against. Gain file keys are the
base checkpoint's tensor names; :func:`find_module` maps them to the loaded
model's modules, whose names can differ by prefix (``language_model.model.``
on disk vs ``model.language_model.`` in memory, say).

Input side (W·diag(s)): the projection's input features are multiplied by s.
Output side (diag(s)·W, bias too): its output is multiplied by s.
"""

from __future__ import annotations

from typing import Any

from gainsurgery.errors import ArchitectureError
from gainsurgery.gainfile import GainFile


def find_module(modules: dict[str, Any], key: str) -> tuple[str, Any]:
    """The module a checkpoint tensor name belongs to, matching by the longest unique suffix.

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


def input_dim_of(module: Any) -> int:
    """Which dim of ``module.weight`` holds its input features (0 for GPT-2's Conv1D)."""
    return 0 if type(module).__name__ == "Conv1D" else 1


def attach_gains(model: Any, gain: GainFile) -> list[Any]:
    """Register forward hooks that apply ``gain`` to ``model``; returns the handles.

    Remove them with ``for h in handles: h.remove()``.

    Raises:
        ArchitectureError: a key matches no module, or a gain runs along a dim
            that is neither the module's input nor its output features.
    """
    import torch

    modules = dict(model.named_modules())
    handles = []
    weight_keys = [k for k in gain.vectors if not k.endswith(".bias")]
    for key in weight_keys:
        name, module = find_module(modules, key)
        param = getattr(module, "weight", None)
        vec = torch.as_tensor(gain.vectors[key])
        in_dim = input_dim_of(module)
        if param is None or param.dim() != 2 or param.shape[gain.dims[key]] != vec.numel():
            raise ArchitectureError(f"gain for {key!r} does not fit module {name!r}")
        if gain.dims[key] == in_dim:
            handles.append(module.register_forward_pre_hook(_scale_input(vec)))
        else:
            bias_key = key[: -len("weight")] + "bias"
            bias = getattr(module, "bias", None)
            if bias is not None and (bias_key not in gain.vectors or
                                     not (gain.vectors[bias_key] == gain.vectors[key]).all()):
                raise ArchitectureError(f"output-side gain for {key!r} needs the same vector on {bias_key!r}")
            handles.append(module.register_forward_hook(_scale_output(vec)))
    return handles


def _scale_input(vec):
    def hook(module, args):
        x = args[0]
        return (x * vec.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])

    return hook


def _scale_output(vec):
    def hook(module, args, output):
        return output * vec.to(device=output.device, dtype=output.dtype)

    return hook
