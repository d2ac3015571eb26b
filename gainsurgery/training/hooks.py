"""Gains on an in-memory transformers model: forward hooks instead of a merge.

The one hook implementation, shared by training (trainable gains, registered as
parameters on the model so optimisers, DDP and ``state_dict`` see them) and by
evaluation and the Python API (fixed gains from a gain file: ``attach``).
Input side (W·diag(s)): the module's input features are multiplied by s.
Output side (diag(s)·W, bias too): its output is multiplied by s. Which dim of a
weight is its input side comes from the registry's layout for the model's type.

Gain file keys are the base checkpoint's tensor names;
:func:`~gainsurgery.architectures.modules.find_module` maps them to the loaded
model's modules. The hooks are also the reference that merged checkpoints are
tested against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from gainsurgery.architectures.modules import find_module, input_dim_of, model_type_of_model
from gainsurgery.architectures.registry import bias_key
from gainsurgery.errors import ArchitectureError, TrainingError
from gainsurgery.gainfile import GainFile

if TYPE_CHECKING:
    from gainsurgery.architectures import Target

#: Name under which trainable gains are registered on the model.
HOLDER_NAME = "gainsurgery_gains"


class GainHooks:
    """Gain vectors applied to a model's modules with forward hooks.

    Remove them with :meth:`remove`, or use the object as a context manager::

        with attach(model, gain):
            logits = model(input_ids).logits   # with the gains
        logits = model(input_ids).logits       # without

    Build one with :func:`attach` (fixed gains) or :meth:`trainable` (training).

    Attributes:
        keys: the checkpoint tensor names of the scaled weights.
        dims: the dim of each weight its vector runs along.
        vectors: the vectors, as torch tensors (``nn.Parameter`` when trainable).
    """

    def __init__(self, model: Any, keys: Sequence[str], dims: Sequence[int], vectors: Sequence[np.ndarray], *,
                 trainable: bool = False) -> None:
        import torch
        from torch import nn

        in_dim = input_dim_of(model_type_of_model(model))
        modules = dict(model.named_modules())
        self.keys, self.dims = list(keys), list(dims)
        tensors = [torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for v in vectors]
        if trainable:
            holder = nn.Module()
            holder.gains = nn.ParameterList([nn.Parameter(t) for t in tensors])
            model.add_module(HOLDER_NAME, holder)
            self.vectors: Any = holder.gains
        else:
            self.vectors = tensors
        self.bias_keys: set[str] = set()
        self.handles: list[Any] = []
        try:
            for i, (key, dim) in enumerate(zip(self.keys, self.dims)):
                name, module = find_module(modules, key)
                param = getattr(module, "weight", None)
                if param is None or param.dim() != 2 or param.shape[dim] != tensors[i].numel():
                    raise ArchitectureError(f"gain for {key!r} does not fit module {name!r}")
                if dim == in_dim:
                    self.handles.append(module.register_forward_pre_hook(_scale_input(self.vectors, i)))
                else:
                    self.handles.append(module.register_forward_hook(_scale_output(self.vectors, i)))
        except BaseException:
            self.remove()
            raise

    @classmethod
    def trainable(cls, model: Any, targets: Sequence[Target], init: GainFile | None = None) -> GainHooks:
        """Trainable gains for ``targets`` (from :func:`~gainsurgery.architectures.resolve_targets`), init 1.

        ``init`` continues from a saved gain file instead. The parameters are
        registered on ``model`` as ``gainsurgery_gains``.

        Raises:
            TrainingError: ``init`` does not match the targets.
        """
        weights = [t for t in targets if t.kind != "bias"]
        vectors = []
        for t in weights:
            if init is None:
                vectors.append(np.ones(t.length, dtype=np.float32))
            elif t.key not in init.vectors or init.vectors[t.key].size != t.length or init.dims[t.key] != t.dim:
                raise TrainingError(f"--resume file does not match this model at {t.key!r}")
            else:
                vectors.append(init.vectors[t.key])
        hooks = cls(model, [t.key for t in weights], [t.dim for t in weights], vectors, trainable=True)
        hooks.bias_keys = {t.key for t in targets if t.kind == "bias"}
        return hooks

    def gain_file(self, metadata: dict[str, Any]) -> GainFile:
        """The current gains as a v1 gain file (an output-side bias shares its weight's vector)."""
        vectors, dims = {}, {}
        for key, dim, vec in zip(self.keys, self.dims, self.vectors):
            vectors[key] = vec.detach().float().cpu().numpy().astype(np.float32)
            dims[key] = dim
            bias = bias_key(key)
            if bias in self.bias_keys:
                vectors[bias], dims[bias] = vectors[key], 0
        return GainFile(vectors, dims, metadata)

    def remove(self) -> None:
        """Remove every hook; the model computes without the gains again."""
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> GainHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach(model: Any, gain: GainFile) -> GainHooks:
    """Apply ``gain`` to ``model`` with forward hooks (no merge); returns the removable hooks.

    Args:
        model: a transformers model in memory (its ``config.model_type`` must be in the registry).
        gain: the gain to apply (keys are the base checkpoint's tensor names).

    Returns:
        :class:`GainHooks`; ``.remove()`` or ``with attach(...)`` takes them off.

    Raises:
        ArchitectureError: a key matches no module, a gain does not fit its module,
            or an output-side gain lacks the same vector on the module's bias.
    """
    modules = dict(model.named_modules())
    in_dim = input_dim_of(model_type_of_model(model))
    keys = [k for k in gain.vectors if not k.endswith(".bias")]
    for key in keys:
        if gain.dims[key] == in_dim:
            continue
        name, module = find_module(modules, key)
        bias = bias_key(key)
        if getattr(module, "bias", None) is not None and (bias not in gain.vectors or
                                                          not (gain.vectors[bias] == gain.vectors[key]).all()):
            raise ArchitectureError(f"output-side gain for {key!r} needs the same vector on {bias!r}")
    return GainHooks(model, keys, [gain.dims[k] for k in keys], [gain.vectors[k] for k in keys])


def _scale_input(vectors: Any, i: int):
    def hook(module, args):
        x = args[0]
        return (x * vectors[i].to(device=x.device, dtype=x.dtype),) + tuple(args[1:])

    return hook


def _scale_output(vectors: Any, i: int):
    def hook(module, args, output):
        return output * vectors[i].to(device=output.device, dtype=output.dtype)

    return hook
