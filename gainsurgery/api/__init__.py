"""The public Python API: gainsurgery for notebooks and pipelines.

Everything the command line does is a call here (the CLI only parses and prints),
re-exported lazily from the package: ``from gainsurgery import apply, load_gain``.

Gain files::

    g = load_gain("legal.safetensors")
    both = stack_gains(["legal.safetensors", "medical.safetensors"])
    save_gain(invert_gain(g), "undo-legal.safetensors")

Merging, by streaming, in constant memory::

    result = apply("base/", ["legal.safetensors"], "merged/", verify=True)

Gains on a model in memory, as forward hooks::

    with attach(model, "legal.safetensors"):
        logits = model(input_ids).logits

Training::

    train(TrainConfig(base="embedded:gemma-3-270m", data=["legal.txt"], output="legal.safetensors"))

Functions that need torch (:func:`attach`, :func:`train`, :func:`evaluate`,
:func:`export_peft`, :func:`import_peft`) need the ``train`` extra.

The functions live by topic: :mod:`~gainsurgery.api.gains` (gain files),
:mod:`~gainsurgery.api.checkpoints` (apply, verify, targets),
:mod:`~gainsurgery.api.hub` (push) and :mod:`~gainsurgery.api.models` (hooks,
training, PEFT); ``gainsurgery.api`` is their one import surface, each name imported
from its module on first use.
"""

from __future__ import annotations

from gainsurgery.lazy_exports import lazy_exports

#: public name -> the module of :mod:`gainsurgery.api` that defines it. They are imported
#: on first use, so that ``from gainsurgery import api`` (every command of the command
#: line does it) does not import numpy and the streaming machinery before a command runs.
_LAZY = {
    **{name: "gainsurgery.api.checkpoints" for name in ("TargetList", "apply", "inspect_gguf", "targets", "verify")},
    **{name: "gainsurgery.api.gains" for name in (
        "inspect_gain", "invert_gain", "load_gain", "power_gain", "save_gain", "stack_gains")},
    **{name: "gainsurgery.api.hub" for name in ("PushPlan", "push")},
    **{name: "gainsurgery.api.models" for name in ("attach", "evaluate", "export_peft", "import_peft", "train")},
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
