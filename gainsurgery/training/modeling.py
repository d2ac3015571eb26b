"""Loading models and tokenizers for training and evaluation (torch + transformers).

A MODEL argument may be a checkpoint folder (base or merged), ``embedded:NAME``,
or a PEFT adapter folder (its base is loaded from ``base_model_name_or_path`` or
``--base``). Imports of torch/transformers stay inside functions so the merge
commands never pay for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gainsurgery.errors import CheckpointError
from gainsurgery.sources import resolve_base

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    """``'bfloat16'`` -> ``torch.bfloat16``; a clear error for anything else."""
    import torch

    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def checkpoint_dtype(folder: Path) -> str:
    """The dtype a checkpoint folder's config.json declares (``float32`` when it says nothing usable)."""
    from gainsurgery.io.checkpoint import read_config

    cfg = read_config(Path(folder))
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return name if name in DTYPES else "float32"


def is_peft_adapter(folder: Path) -> bool:
    """True when ``folder`` holds a PEFT adapter rather than a full checkpoint."""
    return (Path(folder) / "adapter_config.json").is_file()


def load_tokenizer(folder: Path):
    """The tokenizer saved with a checkpoint (refuses folders without one)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: no usable tokenizer ({str(exc).splitlines()[0][:200]})") from None


def load_causal_lm(folder: Path, dtype: str = "float32"):
    """A causal LM from a local checkpoint folder, in eval mode."""
    from transformers import AutoModelForCausalLM

    if not (Path(folder) / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json; not a transformers checkpoint")
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

        cfg = json.loads((folder / "adapter_config.json").read_text())
        base_spec = base or cfg.get("base_model_name_or_path")
        if not base_spec:
            raise CheckpointError(f"{folder}: adapter names no base model; pass --base")
        base_folder = resolve_base(base_spec)
        model = PeftModel.from_pretrained(load_causal_lm(base_folder, dtype), folder).eval()
        return model, load_tokenizer(base_folder), {"kind": "peft-adapter", "peft_type": cfg.get("peft_type"),
                                                    "base": str(base_spec)}
    return load_causal_lm(folder, dtype), load_tokenizer(folder), {"kind": "checkpoint", "folder": str(folder)}
