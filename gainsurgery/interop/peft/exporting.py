"""Export: a gain file as a PEFT (IA)³ adapter folder, claimed and published whole.

:func:`plan_export` maps every gain vector to the (IA)³ module that reproduces it
(or refuses, in one line, a gain that has none); :func:`adapter_config` finds the
shortest ``target_modules``/``feedforward_modules`` lists PEFT's own matching
selects exactly; :func:`export_peft` writes both files into a claimed folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from gainsurgery.architectures import bias_key
from gainsurgery.architectures.modules import find_module
from gainsurgery.errors import ArchitectureError, OutputError
from gainsurgery.gainfile import GainFile, natural_key
from gainsurgery.interop.peft.model import (CONFIG_NAME, WEIGHTS_NAME, IA3Module, layout_of, memory_modules,
                                            peft_can_target)
from gainsurgery.io.atomic import create_file
from gainsurgery.io.checkpoint import Checkpoint
from gainsurgery.io.claims import claim_folder
from gainsurgery.io.inputs import show_name, show_path
from gainsurgery.io.write_errors import no_room, no_room_errno
from gainsurgery.merge.plan import make_plan
from gainsurgery.sources import is_embedded, resolve_base


def plan_export(gain: GainFile, ckpt: Checkpoint, modules: dict[str, Any]) -> list[IA3Module]:
    """Map every vector of ``gain`` to the (IA)³ module that reproduces it.

    Args:
        gain: a gain file whose keys are tensors of ``ckpt``.
        ckpt: the base checkpoint (headers only).
        modules: :func:`memory_modules` of the same base.

    Raises:
        PlanError: a key is not a tensor of the base or does not fit it.
        ArchitectureError: a gain has no (IA)³ equivalent: the tensor is not a
            Linear/Conv1D module in memory (fused MoE experts), an output-side gain
            leaves the module's bias unscaled (PEFT scales it), an input-side gain
            also scales a bias, or a bias is scaled without its weight.
    """
    make_plan(ckpt, gain, allow_negative=True)  # keys, dims and lengths fit the base
    in_dim, conv1d = layout_of(ckpt)
    out: list[IA3Module] = []
    weight_keys = [k for k in sorted(gain.vectors, key=natural_key) if not k.endswith(".bias")]
    used_bias: set[str] = set()
    for key in weight_keys:
        try:
            name, module = find_module(modules, key)
        except ArchitectureError:
            raise ArchitectureError(
                f"PEFT (IA)³ cannot target {show_name(key)}: no single Linear module holds it in the model "
                "transformers builds (fused MoE experts are one 3-D parameter in memory); apply this gain to the "
                "checkpoint instead"
            ) from None
        if not peft_can_target(module):
            raise ArchitectureError(
                f"PEFT (IA)³ targets only Linear and Conv1D modules; {show_name(key)} belongs to {show_name(name)}, "
                f"a {type(module).__name__}"
            )
        if tuple(module.weight.shape) != tuple(ckpt.tensors[key].shape):
            raise ArchitectureError(
                f"{show_name(key)} has shape {tuple(ckpt.tensors[key].shape)} in the checkpoint but module "
                f"{show_name(name)} holds {tuple(module.weight.shape)} in memory; cannot map it to PEFT"
            )
        vec = np.asarray(gain.vectors[key], dtype=np.float32)
        feedforward = gain.dims[key] == in_dim
        bias = bias_key(key)
        has_bias = getattr(module, "bias", None) is not None
        if feedforward:
            if bias in gain.vectors:
                raise ArchitectureError(
                    f"{show_name(key)} is scaled on its input side but {show_name(bias)} is scaled too; "
                    "PEFT (IA)³ input-side (feedforward) vectors never touch the bias"
                )
            out.append(IA3Module(name, key, True, conv1d, vec))
            continue
        if has_bias:
            if bias not in gain.vectors or not np.array_equal(gain.vectors[bias], vec):
                raise ArchitectureError(
                    f"output-side gain on {show_name(key)} leaves its bias unscaled, but PEFT (IA)³ scales the output "
                    f"including the bias; the gain needs the same vector on {show_name(bias)} to export"
                )
            used_bias.add(bias)
        out.append(IA3Module(name, key, False, conv1d, vec, bias if has_bias else None))
    stray = sorted(set(gain.vectors) - set(weight_keys) - used_bias)
    if stray:
        raise ArchitectureError(
            f"{show_name(stray[0])} scales a bias without an output-side gain on its weight; (IA)³ has no such vector"
        )
    if {m.conv1d for m in out} == {True, False}:
        raise ArchitectureError(
            "the gain targets both Linear and Conv1D modules; one PEFT (IA)³ config has a single "
            "fan_in_fan_out flag, so it cannot hold both"
        )
    return out


def _suffix(name: str, k: int) -> str:
    return ".".join(name.split(".")[-k:])


def _peft_matches(config: Any, names: Iterable[str]) -> dict[str, bool]:
    """Modules PEFT would adapt under ``config`` -> whether it treats them as feedforward."""
    from peft.tuners.ia3.model import IA3Model
    from peft.tuners.tuners_utils import check_target_module_exists

    return {n: bool(IA3Model._check_target_module_feedforward(config, n))
            for n in names if n and check_target_module_exists(config, n)}


def module_patterns(targets: Mapping[str, bool], all_names: Iterable[str]) -> tuple[list[str], list[str]]:
    """The shortest ``target_modules``/``feedforward_modules`` suffix lists PEFT matches exactly.

    Args:
        targets: module name -> feedforward (input side) for every adapted module.
        all_names: every module name of the model (PEFT matches against all of them).

    Returns:
        (target_modules, feedforward_modules), sorted. Tries suffixes of 1, 2, ...
        name components (``o_proj``, ``mlp.c_proj``, ...) and keeps the first whose
        matches under PEFT's own rules are exactly ``targets``; full names always are.
    """
    from peft import IA3Config

    all_names = list(all_names)
    depth = max(len(n.split(".")) for n in targets)
    for k in range(1, depth + 1):
        tm = {_suffix(n, k) for n in targets}
        ff = {_suffix(n, k) for n, f in targets.items() if f}
        if ff & {_suffix(n, k) for n, f in targets.items() if not f}:
            continue  # one suffix would name modules of both sides
        config = IA3Config(target_modules=sorted(tm), feedforward_modules=sorted(ff), task_type="CAUSAL_LM")
        if _peft_matches(config, all_names) == dict(targets):
            return sorted(tm), sorted(ff)
    raise ArchitectureError("no PEFT target_modules list selects exactly the gain's modules")  # pragma: no cover


def adapter_config(plan: list[IA3Module], all_names: Iterable[str], base_name: str) -> dict[str, Any]:
    """The ``adapter_config.json`` contents for ``plan`` (PEFT's own field set and defaults)."""
    from peft import IA3Config

    tm, ff = module_patterns({m.name: m.feedforward for m in plan}, all_names)
    config = IA3Config(target_modules=tm, feedforward_modules=ff, fan_in_fan_out=any(m.conv1d for m in plan),
                       task_type="CAUSAL_LM", base_model_name_or_path=base_name, inference_mode=True)
    out = {}
    for key, value in config.to_dict().items():
        if isinstance(value, set):
            value = sorted(value)
        elif hasattr(value, "value"):  # str enums: peft_type, task_type
            value = value.value
        out[key] = value
    return out


@dataclass
class ExportResult:
    """What :func:`export_peft` wrote.

    Attributes:
        adapter_dir: the adapter folder.
        config: the ``adapter_config.json`` contents.
        modules: the exported modules.
    """

    adapter_dir: Path
    config: dict[str, Any]
    modules: list[IA3Module]

    @property
    def num_parameters(self) -> int:
        """Number of (IA)³ values written."""
        return int(sum(m.vector.size for m in self.modules))


def adapter_base_name(base: str, gain: GainFile, base_name: str | None = None) -> str:
    """The ``base_model_name_or_path`` an exported adapter records.

    ``base_name`` when given (used as is); else the gain's ``base_model``, else
    ``base``. An ``embedded:NAME`` base is recorded as its local folder, so
    ``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` can load it (PEFT
    knows Hub ids and paths, not gainsurgery's embedded models).
    """
    if base_name:
        return base_name
    name = gain.metadata.get("base_model")
    name = name if isinstance(name, str) and name else base
    return str(resolve_base(name)) if is_embedded(name) else name


def export_peft(
    gain: GainFile,
    ckpt: Checkpoint,
    adapter_dir: str | os.PathLike[str],
    *,
    base_name: str,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> ExportResult:
    """Write ``gain`` as a PEFT (IA)³ adapter folder for the base ``ckpt``.

    The folder holds ``adapter_config.json`` and ``adapter_model.safetensors``;
    ``PeftModel.from_pretrained(model, adapter_dir)`` on BASE then computes what the
    gain applied to BASE computes. It is claimed and published with
    :func:`gainsurgery.io.claims.claim_folder`: never BASE or a folder around an
    input (``--overwrite`` cannot delete the base), appears whole or not at all.

    Args:
        gain: the gain file, keys = tensor names of ``ckpt``.
        ckpt: the base checkpoint.
        adapter_dir: output folder; must not exist unless ``overwrite``.
        base_name: recorded as ``base_model_name_or_path`` (see :func:`adapter_base_name`).
        overwrite: replace an existing folder (atomically, on success).
        inputs: the other files read (the gain file): never inside ``adapter_dir``.

    Raises:
        OutputError: unusable output location.
        ArchitectureError / PlanError: the gain has no (IA)³ equivalent (see :func:`plan_export`).

    Example:
        >>> from gainsurgery import gainfile, sources  # doctest: +SKIP
        >>> export_peft(gainfile.load("g.safetensors"), sources.open_base("base/"), "adapter/",
        ...             base_name="Qwen/Qwen2.5-0.5B")  # doctest: +SKIP
    """
    # A full disk or a file-size limit anywhere (the claim, the files, the publish) is one line;
    # the claim removes its temp folder on the way out.
    with no_room(f"the adapter folder {show_path(adapter_dir)}"), \
            claim_folder(adapter_dir, inputs=[ckpt.folder, *inputs], overwrite=overwrite,
                         what="adapter folder") as claim:
        modules = memory_modules(ckpt.folder)
        plan = plan_export(gain, ckpt, modules)
        config = adapter_config(plan, modules, base_name)
        tensors = {m.adapter_key: m.vector.reshape(m.adapter_shape) for m in plan}
        _write_adapter(claim.tmp, config, tensors)
        out = claim.publish()
    return ExportResult(out, config, plan)


def _write_adapter(folder: Path, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save

    try:
        with create_file(folder / CONFIG_NAME) as f:
            f.write((json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        data = save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
                    metadata={"format": "pt"})
        with create_file(folder / WEIGHTS_NAME) as f:
            f.write(data)
    except OSError as exc:
        if no_room_errno(exc) is not None:
            raise  # said with where and what to do by export_peft's no_room
        raise OutputError(f"could not write the adapter folder: {exc.strerror or exc}; nothing was left behind") \
            from None
