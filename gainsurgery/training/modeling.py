"""Loading models and tokenizers for training and evaluation (torch + transformers).

A MODEL argument may be a checkpoint folder (base or merged), ``embedded:NAME``,
or a PEFT adapter folder (its base is loaded from ``base_model_name_or_path`` or
``--base``). Imports of torch/transformers stay inside functions so the merge
commands never pay for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gainsurgery.errors import CheckpointError
from gainsurgery.io import jsonsafe
from gainsurgery.io.checkpoint import CONFIG_NAME, open_checkpoint, read_config
from gainsurgery.io.inputs import check_input_folder, open_input, resolve_input, show_path
from gainsurgery.sources import resolve_base

ADAPTER_CONFIG = "adapter_config.json"

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    """``'bfloat16'`` -> ``torch.bfloat16``; a clear error for anything else."""
    import torch

    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def checkpoint_dtype(folder: Path) -> str:
    """The dtype a checkpoint folder's config.json declares (``float32`` when it says nothing usable)."""
    cfg = read_config(Path(folder))
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return name if name in DTYPES else "float32"


def is_peft_adapter(folder: Path) -> bool:
    """True when ``folder`` holds a PEFT adapter rather than a full checkpoint."""
    return resolve_input(folder, ADAPTER_CONFIG, missing_ok=True, error=CheckpointError) is not None


def load_tokenizer(folder: Path):
    """The tokenizer saved with a checkpoint (refuses folders without one).

    transformers reads the tokenizer files by name, so every file of the folder is
    checked first (:func:`gainsurgery.io.inputs.check_input_folder`).
    """
    from transformers import AutoTokenizer

    check_input_folder(folder, error=CheckpointError)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: no usable tokenizer ({str(exc).splitlines()[0][:200]})") from None


def load_causal_lm(folder: Path, dtype: str = "float32"):
    """A causal LM from a local checkpoint folder, in eval mode.

    Before transformers opens anything, every file of the folder is checked (no
    link out, no FIFO) and the index, every header and config.json are validated
    (:func:`gainsurgery.io.checkpoint.open_checkpoint`).
    """
    from transformers import AutoModelForCausalLM

    check_input_folder(folder, error=CheckpointError)
    if resolve_input(folder, CONFIG_NAME, missing_ok=True, error=CheckpointError) is None:
        raise CheckpointError(f"{show_path(folder)}: no config.json; not a transformers checkpoint")
    open_checkpoint(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype))
    return model.eval()


def load_for_eval(spec: str, dtype: str = "float32", base: str | None = None) -> tuple[Any, Any, dict]:
    """Model, tokenizer and a description for ``gainsurgery eval``.

    Returns:
        (model, tokenizer, info) where info names what was loaded.
    """
    folder = resolve_base(spec)
    if is_peft_adapter(folder):
        from peft import PeftModel

        check_input_folder(folder, error=CheckpointError)
        with open_input(folder, ADAPTER_CONFIG, error=CheckpointError) as f:
            raw = jsonsafe.load(f, where=ADAPTER_CONFIG, error=CheckpointError, max_bytes=1 << 20)
        cfg = jsonsafe.Fields(raw, where=ADAPTER_CONFIG, error=CheckpointError)
        base_spec = base or cfg.str("base_model_name_or_path", None, max_chars=4096)
        if not base_spec:
            raise CheckpointError(f"{show_path(folder)}: adapter names no base model; pass --base")
        base_folder = resolve_base(base_spec)
        model = PeftModel.from_pretrained(load_causal_lm(base_folder, dtype), folder).eval()
        return model, load_tokenizer(base_folder), {"kind": "peft-adapter",
                                                    "peft_type": cfg.str("peft_type", None, max_chars=40),
                                                    "base": str(base_spec)}
    return load_causal_lm(folder, dtype), load_tokenizer(folder), {"kind": "checkpoint", "folder": str(folder)}
