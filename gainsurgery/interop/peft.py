"""PEFT (IA)³ adapters <-> gain files.

An (IA)³ adapter learns one vector per targeted module, like GAIN. PEFT's
semantics (``peft/tuners/ia3/layer.py``):

- a *feedforward* module scales its **input**: ``W · diag(l)``, vector stored as
  ``[1, in_features]``; the bias is left alone. This is GAIN's input side.
- any other targeted module scales its **output**, bias included:
  ``diag(l) · W`` and ``b · l``, vector stored as ``[out_features, 1]``. This is
  GAIN's output side (a gain file holds the same vector on the ``.bias`` key).
- ``Conv1D`` (GPT-2) stores weights ``[in, out]``; PEFT needs
  ``fan_in_fan_out: true`` and keeps the vector shapes above.

Adapter tensors are named ``base_model.model.<module>.ia3_l`` where ``<module>``
is the module's name in the model transformers builds in memory, which can
differ from the checkpoint's tensor names (``model.language_model.`` vs
``language_model.model.``). Both directions therefore build BASE's model on the
meta device (no weights are read) and match names with
:func:`gainsurgery.architectures.modules.find_module`. Which dim is a
weight's input side, and whether PEFT needs ``fan_in_fan_out``, comes from the
registry's layout for BASE's model type, not from module classes.

LoRA and other adapter types are refused: their updates are additive
(``W + B·A``), not diagonal gains.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from gainsurgery.architectures import (
    METHODS,
    SIDES,
    bias_key,
    family_of,
    model_type_of,
    num_layers,
    resolve_targets,
)
from gainsurgery.architectures.modules import find_module
from gainsurgery.errors import ArchitectureError, GainFileError, GainSurgeryError, OutputError
from gainsurgery.gainfile import BASE_TENSORS_KEY, GainFile, check_values, first_line, natural_key
from gainsurgery.io import jsonsafe
from gainsurgery.io.atomic import create_file
from gainsurgery.io.checkpoint import Checkpoint, fingerprint, read_config
from gainsurgery.io.claims import claim_folder
from gainsurgery.io.fingerprint import base_tensors_sha256
from gainsurgery.io.inputs import open_input, resolve_input, show_name, show_path
from gainsurgery.io.write_errors import no_room, no_room_errno
from gainsurgery.io.safetensors import parse_header
from gainsurgery.sources import base_model_name, is_embedded, resolve_base

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: Size limits of an adapter's files we read, in bytes.
MAX_ADAPTER_CONFIG_BYTES = 1 << 20
MAX_ADAPTER_WEIGHTS_BYTES = 256 << 20
#: PeftModel wraps the transformers model as ``base_model.model``; the adapter
#: name (``default``) is stripped on save and re-inserted on load.
KEY_PREFIX = "base_model.model."
KEY_SUFFIX = ".ia3_l"


@dataclass(frozen=True)
class IA3Module:
    """One (IA)³ vector and the checkpoint tensor(s) it scales.

    Attributes:
        name: module name in the model as transformers builds it (PEFT's naming).
        key: the weight's tensor name in the base checkpoint (the gain file key).
        feedforward: True for input side (PEFT feedforward module), else output side.
        conv1d: the module is GPT-2's ``Conv1D`` (weight stored ``[in, out]``).
        vector: the float32 gain vector.
        bias_key: checkpoint name of the bias an output-side vector also scales.
    """

    name: str
    key: str
    feedforward: bool
    conv1d: bool
    vector: np.ndarray
    bias_key: str | None = None

    @property
    def adapter_key(self) -> str:
        """The tensor name PEFT saves and loads for this module."""
        return KEY_PREFIX + self.name + KEY_SUFFIX

    @property
    def adapter_shape(self) -> tuple[int, int]:
        """PEFT's shape for the vector: ``[1, in]`` (feedforward) or ``[out, 1]``."""
        return (1, self.vector.size) if self.feedforward else (self.vector.size, 1)


# --------------------------------------------------------------------------- the model in memory


def memory_modules(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Module name -> module of the model ``AutoModelForCausalLM`` builds from ``folder``.

    Built on the meta device from ``config.json`` alone: no weights are read and
    no memory is allocated for them.

    Raises:
        ArchitectureError: transformers cannot build a causal LM from the config.
    """
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    # Our own reading of config.json (a regular file inside the folder, checked JSON),
    # handed to transformers as a dict: it never opens the folder's files itself here.
    raw = read_config(folder)
    try:
        config = CONFIG_MAPPING[raw.get("model_type")].from_dict(raw)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArchitectureError(
            f"transformers cannot build a causal LM from {folder}/config.json ({first_line(exc)}); "
            "PEFT adapters name modules of that model, so it is needed"
        ) from None
    return dict(model.named_modules())


def _peft_can_target(module: Any) -> bool:
    """PEFT (IA)³ wraps ``nn.Linear`` and transformers' ``Conv1D`` modules only."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def _layout(ckpt: Checkpoint) -> tuple[int, bool]:
    """(input dim of a target weight, whether weights are stored ``[in, out]``) from the registry."""
    family = family_of(model_type_of(ckpt.config))
    return family.input_dim, family.layout == "conv1d"


# --------------------------------------------------------------------------- export


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
    from gainsurgery.merge.plan import make_plan

    make_plan(ckpt, gain, allow_negative=True)  # keys, dims and lengths fit the base
    in_dim, conv1d = _layout(ckpt)
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
        if not _peft_can_target(module):
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


# --------------------------------------------------------------------------- import


def read_adapter(adapter_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a PEFT (IA)³ adapter folder: its config and ``ia3_l`` tensors as float32 arrays.

    Both files are read as hostile input: regular files inside the folder (no link
    out, no FIFO), the config as JSON within limits with its fields type-checked
    (a ``feedforward_modules`` regex that does not compile is one line), the
    weights' header held to safetensors' rules before any tensor is decoded.

    Raises:
        GainFileError: missing or malformed files, a non-(IA)³ adapter (LoRA is
            additive, not a diagonal gain), pickled weights (never loaded), or
            tensors other than ``ia3_l`` vectors (e.g. ``modules_to_save``).
    """
    folder = Path(adapter_dir)
    shown = show_path(folder)
    if not folder.is_dir():
        raise GainFileError(f"adapter folder not found: {shown}")
    if resolve_input(folder, CONFIG_NAME, missing_ok=True, error=GainFileError) is None:
        raise GainFileError(f"{shown}: no {CONFIG_NAME}; not a PEFT adapter folder")
    with open_input(folder, CONFIG_NAME, error=GainFileError) as f:
        raw = jsonsafe.load(f, where=CONFIG_NAME, error=GainFileError, max_bytes=MAX_ADAPTER_CONFIG_BYTES)
    cfg = jsonsafe.Fields(raw, where=CONFIG_NAME, error=GainFileError)
    peft_type = str(cfg.str("peft_type", "none", max_chars=40))
    if peft_type.upper() != "IA3":
        why = ("its updates are additive (W + B·A, new directions), not a diagonal gain W·diag(s), "
               "so no gain file can represent it" if peft_type.upper() in ("LORA", "ADALORA", "LOHA", "LOKR", "DORA")
               else "only IA3 adapters are diagonal gains")
        raise GainFileError(f"{shown}: a {show_path(peft_type)} adapter cannot be imported: {why}")
    if cfg.raw("modules_to_save", None):
        raise GainFileError(f"{shown}: the adapter also saves full modules (modules_to_save); "
                            "those are new weights, not gains")
    cfg.str("base_model_name_or_path", None, max_chars=1000)
    _feedforward_rule(cfg)  # checked now: one line for a list of non-strings or a bad regex
    if resolve_input(folder, WEIGHTS_NAME, missing_ok=True, error=GainFileError) is None:
        if resolve_input(folder, "adapter_model.bin", missing_ok=True, error=GainFileError) is not None:
            raise GainFileError(f"{shown}: adapter_model.bin is a pickle; gainsurgery never unpickles. "
                                "Re-save it with save_pretrained(..., safe_serialization=True)")
        raise GainFileError(f"{shown}: no {WEIGHTS_NAME}")
    with open_input(folder, WEIGHTS_NAME, error=GainFileError) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_ADAPTER_WEIGHTS_BYTES:
            raise GainFileError(f"{WEIGHTS_NAME}: {size} bytes, more than an (IA)³ adapter holds; refusing to read it")
        parse_header(f, size, WEIGHTS_NAME, error=GainFileError)
        f.seek(0)
        data = f.read()
    try:
        from safetensors.torch import load

        raw_tensors = load(data)
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise GainFileError(f"{WEIGHTS_NAME}: not a readable safetensors file ({first_line(exc)})") from None
    tensors: dict[str, np.ndarray] = {}
    for key, t in raw_tensors.items():
        if not (key.startswith(KEY_PREFIX) and key.endswith(KEY_SUFFIX)):
            raise GainFileError(f"{WEIGHTS_NAME}: unexpected tensor {key[:200]!r}; an IA3 adapter holds only "
                                f"'{KEY_PREFIX}<module>{KEY_SUFFIX}' vectors")
        if t.dim() != 2 or 1 not in t.shape:
            raise GainFileError(f"{WEIGHTS_NAME}: {key[:200]!r} has shape {tuple(t.shape)}; IA3 vectors are "
                                "[1, n] or [n, 1]")
        tensors[key[len(KEY_PREFIX): -len(KEY_SUFFIX)]] = t.float().numpy()
    if not tensors:
        raise GainFileError(f"{WEIGHTS_NAME}: holds no ia3_l vectors")
    return cfg.value, tensors


def _feedforward_rule(cfg: jsonsafe.Fields) -> str | list[str] | None:
    """``feedforward_modules`` checked: a regex that compiles, or a list of strings (or absent)."""
    ff = cfg.raw("feedforward_modules", None)
    if ff is None or isinstance(ff, list):
        return cfg.str_list("feedforward_modules", None)
    value = cfg.str("feedforward_modules", max_chars=10_000)
    _compiled(value)
    return value


#: Repetitions (``*``, ``+``, ``{m,n}`` with n > 1) a ``feedforward_modules`` regex may hold. Python's
#: ``re`` backtracks: k repetitions cost up to len(name)**k steps on a module name, and a repetition
#: inside a repetition ``(a*)*`` costs 2**len(name). Real patterns (``.*\.(down_proj|c_proj)$``) have 1-2.
MAX_REGEX_REPEATS = 4


@functools.lru_cache(maxsize=8)
def _compiled(pattern: str) -> re.Pattern[str]:
    try:
        compiled = re.compile(pattern)
        repeats, nested = _repeats(_sre_parse.parse(pattern))
    except (re.error, RecursionError, OverflowError) as exc:
        raise GainFileError(f"{CONFIG_NAME}: feedforward_modules is not a valid regular expression "
                            f"({first_line(exc)[:120]})") from None
    if nested or repeats > MAX_REGEX_REPEATS:
        # A hostile adapter's regex would take hours to match a module name (catastrophic backtracking).
        raise GainFileError(f"{CONFIG_NAME}: feedforward_modules is a regular expression with "
                            f"{'a repetition inside a repetition' if nested else f'{repeats} repetitions'}; "
                            f"at most {MAX_REGEX_REPEATS}, none nested, are accepted (or give a list of names)")
    return compiled


try:  # the parser re.compile uses (renamed in Python 3.11)
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

_REPEAT_OPS = {op for op in (_sre_parse.MAX_REPEAT, _sre_parse.MIN_REPEAT, getattr(_sre_parse, "POSSESSIVE_REPEAT", None))
               if op is not None}


def _repeats(node: Any, inside: bool = False) -> tuple[int, bool]:
    """(repetitions, whether one lies inside another) in a parsed regular expression."""
    count, nested = 0, False
    if isinstance(node, (list, tuple, _sre_parse.SubPattern)):
        items = list(node)
        if len(items) == 2 and items[0] in _REPEAT_OPS and isinstance(items[1], tuple):  # (op, (min, max, sub))
            _, high, sub = items[1]
            many = high > 1
            inner, deeper = _repeats(sub, inside or many)
            return inner + many, deeper or (many and inside)
        for item in items:
            c, n = _repeats(item, inside)
            count, nested = count + c, nested or n
    return count, nested


def _is_feedforward(config: Mapping[str, Any], name: str) -> bool:
    # PEFT's rule (IA3Model._check_target_module_feedforward): a string is a regex
    # that must match the whole name; a list matches by plain suffix.
    ff = config.get("feedforward_modules")
    if not ff:
        return False
    if isinstance(ff, str):
        return _compiled(ff).fullmatch(name) is not None
    return any(name.endswith(s) for s in ff)


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
    in_dim, _ = _layout(ckpt)
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
        if not _peft_can_target(module):
            raise ArchitectureError(f"adapter module {show_name(name)} is a {type(module).__name__}; "
                                    "only Linear and Conv1D vectors map to gain files")
        key = checkpoint_key_for(name, ckpt, modules)
        feedforward = _is_feedforward(config, name)
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
