"""The (IA)³ side of the map: an adapter's file names and keys, one vector as PEFT stores it, and
the model transformers builds from BASE (on the meta device), whose module names an adapter uses."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from gainsurgery.architectures import family_of, model_type_of
from gainsurgery.errors import ArchitectureError
from gainsurgery.gainfile import first_line
from gainsurgery.io.checkpoint import Checkpoint, read_config

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


def peft_can_target(module: Any) -> bool:
    """PEFT (IA)³ wraps ``nn.Linear`` and transformers' ``Conv1D`` modules only."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def layout_of(ckpt: Checkpoint) -> tuple[int, bool]:
    """(input dim of a target weight, whether weights are stored ``[in, out]``) from the registry."""
    family = family_of(model_type_of(ckpt.config))
    return family.input_dim, family.layout == "conv1d"
