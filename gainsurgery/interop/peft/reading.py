"""Reading a PEFT (IA)³ adapter folder as hostile input: its config, its ``ia3_l`` vectors, and
PEFT's feedforward rule (a ``feedforward_modules`` regex held to a backtracking budget)."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from gainsurgery.errors import GainFileError
from gainsurgery.gainfile import first_line
from gainsurgery.interop.peft.model import (CONFIG_NAME, KEY_PREFIX, KEY_SUFFIX, MAX_ADAPTER_CONFIG_BYTES,
                                            MAX_ADAPTER_WEIGHTS_BYTES, WEIGHTS_NAME)
from gainsurgery.io import jsonsafe
from gainsurgery.io.inputs import open_input, resolve_input, show_path
from gainsurgery.io.safetensors import parse_header


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


def is_feedforward(config: Mapping[str, Any], name: str) -> bool:
    # PEFT's rule (IA3Model._check_target_module_feedforward): a string is a regex
    # that must match the whole name; a list matches by plain suffix.
    ff = config.get("feedforward_modules")
    if not ff:
        return False
    if isinstance(ff, str):
        return _compiled(ff).fullmatch(name) is not None
    return any(name.endswith(s) for s in ff)
