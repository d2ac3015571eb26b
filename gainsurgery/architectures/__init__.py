"""Architecture knowledge: the registry (typed data), target resolution, module lookup.

- :mod:`~gainsurgery.architectures.registry`: model families as data, with the
  weight layout that decides which dim is the input side;
- :mod:`~gainsurgery.architectures.targets`: the tensors a GAIN method scales in
  a checkpoint, from its headers;
- :mod:`~gainsurgery.architectures.modules`: checkpoint tensor names -> modules of
  a model built in memory (for hooks and PEFT).
"""

from gainsurgery.architectures.registry import (
    FAMILIES,
    METHODS,
    MODEL_TYPES,
    SIDES,
    Family,
    bias_key,
    family_of,
    supported_model_types,
)
from gainsurgery.architectures.targets import Target, model_type_of, num_layers, resolve_targets

__all__ = ["FAMILIES", "METHODS", "MODEL_TYPES", "SIDES", "Family", "Target", "bias_key", "family_of",
           "model_type_of", "num_layers", "resolve_targets", "supported_model_types"]
