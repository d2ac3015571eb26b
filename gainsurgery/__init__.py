"""gainsurgery: GAIN model surgery (arXiv 2604.04516).

Train, share, stack and apply diagonal gain vectors ``W_new = W · diag(s)`` on
causal language models, streaming over sharded safetensors checkpoints.

The Python API (:mod:`gainsurgery.api`) is re-exported here and imported on
first use, so ``import gainsurgery`` stays cheap::

    from gainsurgery import apply, attach, load_gain, stack_gains, train, TrainConfig

See docs/api.md for examples and docs/architecture.md for the package layout.
"""

from __future__ import annotations

from gainsurgery.lazy_exports import lazy_exports

__version__ = "0.1.0"

from gainsurgery.errors import GainSurgeryError  # noqa: E402

#: public name -> module that defines it (imported on first access).
_LAZY = {
    **{name: "gainsurgery.api" for name in (
        "apply", "attach", "evaluate", "export_peft", "import_peft", "inspect_gain", "inspect_gguf", "invert_gain",
        "load_gain", "power_gain", "push", "save_gain", "stack_gains", "targets", "train", "verify")},
    "GainFile": "gainsurgery.gainfile",
    "ApplyResult": "gainsurgery.applying.result",
    "VerifyReport": "gainsurgery.merge.verify",
    "TrainConfig": "gainsurgery.training.config",
    "TrainResult": "gainsurgery.training.config",
    "GainHooks": "gainsurgery.training.hooks",
    "HubClient": "gainsurgery.hub.client",
    "HubConfig": "gainsurgery.hub.client",
}

__all__ = ["GainSurgeryError", "__version__", *sorted(_LAZY)]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
