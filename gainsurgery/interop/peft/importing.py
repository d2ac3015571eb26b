"""Import: a PEFT (IA)³ adapter for BASE as a v1 gain file (input or output side per module,
the bias scaled where PEFT scales it, ``method`` recognised when the vectors are GAIN's targets)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from gainsurgery.architectures import METHODS, SIDES, bias_key, model_type_of, num_layers, resolve_targets
from gainsurgery.architectures.modules import find_module
from gainsurgery.errors import ArchitectureError, GainFileError, GainSurgeryError
from gainsurgery.gainfile import BASE_TENSORS_KEY, GainFile, check_values, natural_key
from gainsurgery.interop.peft.model import layout_of, memory_modules, peft_can_target
from gainsurgery.interop.peft.reading import is_feedforward, read_adapter
from gainsurgery.io.checkpoint import Checkpoint, fingerprint
from gainsurgery.io.fingerprint import base_tensors_sha256
from gainsurgery.io.inputs import show_name
from gainsurgery.sources import base_model_name


def checkpoint_key_for(module_name: str, ckpt: Checkpoint, modules: dict[str, Any]) -> str:
    """The checkpoint weight tensor that the in-memory module ``module_name`` is loaded from.

    Raises:
        ArchitectureError: no checkpoint tensor (or more than one) maps to it.
    """
    leaf = module_name.rsplit(".", 1)[-1]
    hits = []
    for key in ckpt.tensors:
        if not key.endswith(f"{leaf}.weight"):
            continue
        try:
            if find_module(modules, key)[0] == module_name:
                hits.append(key)
        except ArchitectureError:
            continue
    if len(hits) != 1:
        raise ArchitectureError(
            f"adapter module {show_name(module_name)} maps to {len(hits) or 'no'} weight tensor(s) of the base "
            "checkpoint" + (f" ({hits[:2]})" if hits else "; was the adapter trained on another model?")
        )
    return hits[0]


def import_peft(
    adapter_dir: str | os.PathLike[str],
    ckpt: Checkpoint,
    *,
    base_name: str | None = None,
    allow_negative: bool = False,
    description: str | None = None,
) -> GainFile:
    """Turn a PEFT (IA)³ adapter for the base ``ckpt`` into a v1 gain file.

    Feedforward vectors become input-side gains (dim 1 of a Linear weight, dim 0
    of a Conv1D weight); the others output-side gains, with the same vector on the
    module's bias when it has one (PEFT scales it). ``method`` is ``gain`` or
    ``gain-ffn`` when the vectors are exactly those targets, else ``ia3``; ``side``
    is ``in``, ``out`` or ``mixed``.

    Raises:
        GainFileError: the adapter is unreadable, not (IA)³, or holds zero,
            non-finite or (unless ``allow_negative``) negative values.
        ArchitectureError: a module is not in BASE's model or has no checkpoint tensor.

    Example:
        >>> from gainsurgery import sources  # doctest: +SKIP
        >>> g = import_peft("adapter/", sources.open_base("base/"))  # doctest: +SKIP
        >>> g.save("gain.safetensors")  # doctest: +SKIP
    """
    config, tensors = read_adapter(adapter_dir)
    in_dim, _ = layout_of(ckpt)
    modules = memory_modules(ckpt.folder)
    vectors: dict[str, np.ndarray] = {}
    dims: dict[str, int] = {}
    sides = set()
    for name in sorted(tensors, key=natural_key):
        arr = tensors[name]
        module = modules.get(name)
        if module is None:
            raise ArchitectureError(
                f"adapter module {show_name(name)} is not a module of the model transformers builds from the base; "
                "was the adapter trained on another model?"
            )
        if not peft_can_target(module):
            raise ArchitectureError(f"adapter module {show_name(name)} is a {type(module).__name__}; "
                                    "only Linear and Conv1D vectors map to gain files")
        key = checkpoint_key_for(name, ckpt, modules)
        feedforward = is_feedforward(config, name)
        dim = in_dim if feedforward else 1 - in_dim
        want = (1, module.weight.shape[dim]) if feedforward else (module.weight.shape[dim], 1)
        if tuple(arr.shape) != want:
            kind = "feedforward" if feedforward else "non-feedforward"
            raise GainFileError(
                f"{name}: ia3_l has shape {tuple(arr.shape)} but a {kind} vector on this module is {want} "
                "(does feedforward_modules match the adapter?)"
            )
        vec = np.ascontiguousarray(arr.reshape(-1), dtype=np.float32)
        check_values(vec, key, allow_negative=allow_negative, source=str(adapter_dir))
        vectors[key], dims[key] = vec, dim
        sides.add("in" if feedforward else "out")
        bias = bias_key(key)
        if not feedforward and bias in ckpt.tensors:
            vectors[bias], dims[bias] = vec.copy(), 0
    side = sides.pop() if len(sides) == 1 else "mixed"
    metadata = {
        "method": _infer_method(ckpt, dims, side),
        "side": side,
        # A Hub id or embedded:NAME only, never a local path (see sources.base_model_name).
        "base_model": base_model_name(base_name) if base_name else None,
        "base_fingerprint": fingerprint(ckpt),
        # The adapter was trained on this base's weights (the user says so with --base): record them.
        BASE_TENSORS_KEY: base_tensors_sha256(ckpt, vectors),
        "description": description or f"imported from PEFT IA3 adapter {Path(adapter_dir).name} "
                                      f"({len(tensors)} modules)",
    }
    gain = GainFile(vectors, dims, {k: v for k, v in metadata.items() if v})
    gain.validate(allow_negative=allow_negative, source=str(adapter_dir))
    return gain


def _infer_method(ckpt: Checkpoint, dims: Mapping[str, int], side: str) -> str:
    """``gain``/``gain-ffn`` when ``dims`` are exactly that method's targets, else ``ia3``."""
    if side not in SIDES:
        return "ia3"
    shapes = {n: t.shape for n, t in ckpt.tensors.items()}
    for method in METHODS:
        try:
            targets = resolve_targets(shapes, model_type_of(ckpt.config), method, side, num_layers(ckpt.config))
        except GainSurgeryError:
            return "ia3"
        if {t.key: t.dim for t in targets} == dict(dims):
            return method
    return "ia3"
