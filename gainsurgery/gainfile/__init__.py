"""The gain file: format version 1 (see docs/gain-format.md, normative), and what is done with gain files.

A gain file is a safetensors file whose tensors are 1-D float32 vectors, one per
adapted base tensor, keyed by that tensor's exact name in the base checkpoint.
``__metadata__`` holds ``format = "gainsurgery.gain/1"`` and ``dims``, a JSON
object mapping each key to the dim of the base tensor the vector runs along.

- :mod:`.format_v1`: the format: :class:`GainFile` (validate, save), :func:`load`, metadata decoding;
- :mod:`.algebra`: :func:`stack`, :func:`invert`, :func:`power` (and ``G@α`` specs), :func:`identity`,
  :func:`load_many`;
- :mod:`.provenance`: :func:`describe` (a gain's provenance entry) and the base fingerprints a gain
  carries (:func:`base_provenance`);
- :mod:`.summary`: :func:`stats` for ``inspect`` and model cards.

Every name is importable from here (``from gainsurgery import gainfile as gf; gf.load(...)``).
It needs only numpy and safetensors, so the apply path never imports torch.
"""

from __future__ import annotations

from gainsurgery.gainfile.algebra import MAX_POWER, identity, invert, load_many, power, split_power, stack
from gainsurgery.gainfile.format_v1 import (BASE_TENSORS_KEY, FORMAT, JSON_METADATA, MAX_GAIN_FILE_BYTES,
                                            TEXT_METADATA, GainFile, check_values, decode_metadata, first_line,
                                            layer_label, load, natural_key)
from gainsurgery.gainfile.provenance import BaseCheck, BaseProvenance, base_checks, base_provenance, describe
from gainsurgery.gainfile.summary import format_count, stats, summarize

__all__ = ["BASE_TENSORS_KEY", "FORMAT", "JSON_METADATA", "MAX_GAIN_FILE_BYTES", "MAX_POWER", "TEXT_METADATA",
           "BaseCheck", "BaseProvenance", "GainFile", "base_checks", "base_provenance", "check_values",
           "decode_metadata", "describe", "first_line", "format_count", "identity", "invert", "layer_label", "load",
           "load_many", "natural_key", "power", "split_power", "stack", "stats", "summarize"]
