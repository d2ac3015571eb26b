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

The package, in the order of the data: :mod:`.model` (file names, one vector as
PEFT stores it, the model in memory), :mod:`.exporting` (gain file -> adapter
folder), :mod:`.reading` (an adapter folder read as hostile input) and
:mod:`.importing` (adapter -> gain file). Every name is importable from here.
"""

from __future__ import annotations

from gainsurgery.interop.peft.exporting import (ExportResult, adapter_base_name, adapter_config, export_peft,
                                                module_patterns, plan_export)
from gainsurgery.interop.peft.importing import checkpoint_key_for, import_peft
from gainsurgery.interop.peft.model import (CONFIG_NAME, KEY_PREFIX, KEY_SUFFIX, MAX_ADAPTER_CONFIG_BYTES,
                                            MAX_ADAPTER_WEIGHTS_BYTES, WEIGHTS_NAME, IA3Module, memory_modules)
from gainsurgery.interop.peft.reading import MAX_REGEX_REPEATS, read_adapter

__all__ = ["CONFIG_NAME", "KEY_PREFIX", "KEY_SUFFIX", "MAX_ADAPTER_CONFIG_BYTES", "MAX_ADAPTER_WEIGHTS_BYTES",
           "MAX_REGEX_REPEATS", "WEIGHTS_NAME", "ExportResult", "IA3Module", "adapter_base_name", "adapter_config",
           "checkpoint_key_for", "export_peft", "import_peft", "memory_modules", "module_patterns", "plan_export",
           "read_adapter"]
