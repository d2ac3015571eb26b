"""Training and evaluating on an in-memory model (torch; the ``train`` extra).

- :mod:`~gainsurgery.training.config`: :class:`TrainConfig`, :class:`TrainResult`,
  the methods and their default learning rates;
- :mod:`~gainsurgery.training.loop`: :func:`train`, data -> model -> loss -> step;
- :mod:`~gainsurgery.training.hooks`: the one forward-hook implementation (trainable
  gains in training, fixed gains for evaluation and :func:`gainsurgery.api.attach`);
- :mod:`~gainsurgery.training.data`: domain text -> packed token windows;
- :mod:`~gainsurgery.training.evaluation`: perplexity and yes/no accuracy;
- :mod:`~gainsurgery.training.modeling`: loading models and tokenizers.

Importing this package needs no torch; running :func:`train` does.
"""

from __future__ import annotations

from typing import Any

from gainsurgery.training.config import DEFAULT_LR, METHODS, TrainConfig, TrainResult

__all__ = ["DEFAULT_LR", "METHODS", "TrainConfig", "TrainResult", "train"]


def __getattr__(name: str) -> Any:
    # On first use: the loop imports tqdm and the train extra's modules, which importing this package must not.
    if name == "train":
        from gainsurgery.training.loop import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
