"""Models in memory and training (torch, the ``train`` extra): attach gains as hooks, train, evaluate,
convert to and from PEFT (IA)³ adapters.

The modules imported here import torch only when a function runs, so importing
this one stays cheap without the extra.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from gainsurgery import gainfile as gf
from gainsurgery.api.gains import _load_each
from gainsurgery.extras import require_extra
from gainsurgery.gainfile import GainFile
from gainsurgery.interop import peft
from gainsurgery.interop.peft import ExportResult
from gainsurgery.sources.local import open_base
from gainsurgery.training import TrainConfig, TrainResult
from gainsurgery.training.evaluation import evaluate as run_evaluation
from gainsurgery.training.hooks import GainHooks
from gainsurgery.training.hooks import attach as attach_hooks
from gainsurgery.training.loop import train as run_training


def attach(model: Any, gains: GainFile | str | os.PathLike[str] | Sequence[GainFile | str | os.PathLike[str]]
           ) -> GainHooks:
    """Apply gains to an in-memory transformers model with forward hooks (no merge).

    Several gains are stacked first. The returned handle removes the hooks with
    ``.remove()``, and is a context manager that removes them on exit.

    Args:
        model: a transformers causal LM (its ``config.model_type`` must be supported).
        gains: a gain file (path) or :class:`GainFile`, or a list of them.

    Returns:
        A :class:`~gainsurgery.training.hooks.GainHooks` handle.

    Raises:
        MissingExtraError: torch is not installed (the ``train`` extra).
        ArchitectureError: a gain key matches no module of the model, or does not fit it.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("base/")  # doctest: +SKIP
        >>> with attach(model, "legal.safetensors"):  # doctest: +SKIP
        ...     adapted = model(input_ids).logits
        >>> plain = model(input_ids).logits  # hooks removed  # doctest: +SKIP
    """
    require_extra("train", "attach()")

    items = [gains] if isinstance(gains, (GainFile, str, os.PathLike)) else list(gains)
    loaded = [g for g, _, _ in _load_each(items, allow_negative=True)]
    gain = loaded[0] if len(loaded) == 1 else gf.stack(loaded)
    return attach_hooks(model, gain)


def train(config: TrainConfig) -> TrainResult:
    """Train GAIN gains (or a LoRA / IA3 baseline) on domain text and save them.

    The base stays frozen; one gain per adapted weight is learned (init 1) through
    forward hooks. GAIN methods write a v1 gain file, ``lora``/``ia3`` a PEFT
    adapter folder, to ``config.output``.

    Args:
        config: a :class:`~gainsurgery.training.config.TrainConfig`.

    Returns:
        A :class:`~gainsurgery.training.config.TrainResult` (loss, timings, evaluations).

    Raises:
        TrainingError: bad options, checked before the model is loaded; a diverging loss.
        MissingExtraError: the ``train`` extra is not installed.

    Example:
        >>> from gainsurgery import TrainConfig, train
        >>> result = train(TrainConfig(base="embedded:gemma-3-270m", data=["legal.txt"],
        ...                            output="legal.safetensors", steps=30))  # doctest: +SKIP
        >>> result.final_loss  # doctest: +SKIP
    """
    return run_training(config)


def evaluate(model: str, **kwargs: Any) -> dict[str, Any]:
    """Perplexity per domain and yes/no accuracy of a model, optionally with gains as hooks.

    See :func:`gainsurgery.training.evaluation.evaluate` for the arguments.

    Example:
        >>> evaluate("merged/", data={"legal": "legal/validation.txt"})["domains"]["legal"]["ppl"]  # doctest: +SKIP
    """
    return run_evaluation(model, **kwargs)


def export_peft(gain: str | os.PathLike[str], adapter_dir: str | os.PathLike[str], *, base: str,
                base_name: str | None = None, overwrite: bool = False, allow_negative: bool = False
                ) -> ExportResult:
    """Write a gain file as a PEFT (IA)³ adapter folder for ``base``.

    Input-side gains become feedforward modules (input scaled), output-side gains
    non-feedforward modules (output and bias scaled); module names are those of the
    model transformers builds from BASE.

    Args:
        gain: the gain file.
        adapter_dir: the adapter folder to write (appears whole, or not at all).
        base: the base the gain was made for (folder or ``embedded:NAME``).
        base_name: ``base_model_name_or_path`` to record (default: the gain's
            ``base_model``, else BASE; an embedded base as its local folder, so
            ``AutoPeftModelForCausalLM`` can load the adapter).
        overwrite: replace an existing adapter folder.
        allow_negative: accept negative gains.

    Returns:
        An :class:`~gainsurgery.interop.peft.ExportResult`.

    Raises:
        ArchitectureError / PlanError: the gain has no (IA)³ equivalent, or the folder is unusable.

    Example:
        >>> export_peft("legal.safetensors", "adapter/", base="embedded:gemma-3-270m")  # doctest: +SKIP
    """
    require_extra("train", "export_peft()")

    g = gf.load(gain, allow_negative=allow_negative)
    ckpt = open_base(base)
    return peft.export_peft(g, ckpt, adapter_dir, base_name=peft.adapter_base_name(base, g, base_name),
                            overwrite=overwrite, inputs=[gain])


def import_peft(adapter_dir: str | os.PathLike[str], *, base: str, description: str | None = None,
                allow_negative: bool = False) -> GainFile:
    """Turn a PEFT (IA)³ adapter into a gain file keyed by ``base``'s tensor names.

    LoRA and other additive adapters are refused: W + B·A is not a diagonal gain.

    Args:
        adapter_dir: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        base: the base the adapter was trained on (folder or ``embedded:NAME``).
        description: free text stored in the metadata.
        allow_negative: accept negative values.

    Returns:
        The gain (``method`` gain/gain-ffn when the vectors are exactly those targets, else ia3).

    Example:
        >>> save_gain(import_peft("adapter/", base="base/"), "gain.safetensors")  # doctest: +SKIP
    """
    require_extra("train", "import_peft()")

    return peft.import_peft(adapter_dir, open_base(base), base_name=base, allow_negative=allow_negative,
                            description=description)
