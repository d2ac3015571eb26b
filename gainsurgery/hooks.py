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

from gainsurgery.architectures.modules import find_module, input_dim_of, model_type_of_model
from gainsurgery.architectures.registry import bias_key
from gainsurgery.errors import ArchitectureError
from gainsurgery.gainfile import GainFile


def attach_gains(model: Any, gain: GainFile) -> list[Any]:
    """Register forward hooks that apply ``gain`` to ``model``; returns the handles.

    Remove them with ``for h in handles: h.remove()``.

    Raises:
        ArchitectureError: a key matches no module, or a gain runs along a dim
            that is neither the module's input nor its output features.
    """
    import torch

    modules = dict(model.named_modules())
    in_dim = input_dim_of(model_type_of_model(model))
    handles = []
    weight_keys = [k for k in gain.vectors if not k.endswith(".bias")]
    for key in weight_keys:
        name, module = find_module(modules, key)
        param = getattr(module, "weight", None)
        vec = torch.as_tensor(gain.vectors[key])
        if param is None or param.dim() != 2 or param.shape[gain.dims[key]] != vec.numel():
            raise ArchitectureError(f"gain for {key!r} does not fit module {name!r}")
        if gain.dims[key] == in_dim:
            handles.append(module.register_forward_pre_hook(_scale_input(vec)))
        else:
            bias = bias_key(key)
            if getattr(module, "bias", None) is not None and (bias not in gain.vectors or
                                                              not (gain.vectors[bias] == gain.vectors[key]).all()):
                raise ArchitectureError(f"output-side gain for {key!r} needs the same vector on {bias!r}")
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
