"""Gains applied straight onto GGUF files (llama.cpp's format), quantized or not.

The engine, in the order an apply uses it (see docs/gguf.md):

1. :func:`open_gguf` (:mod:`.opening`): the file opened safely, its header pre-checked
   within :class:`GGUFLimits`, then parsed by the ``gguf`` library;
2. :func:`make_plan` (:mod:`.plan`, pure): gain keys mapped to GGUF tensors through the
   library's name map (:mod:`.names`), stacked in float32, column gains moved exactly
   onto other tensors' rows where the algebra allows, one route per tensor
   (``float`` / ``fold`` / ``requantize``);
3. :func:`measure` (:mod:`.engine`): every route's error measured against the exact
   float32 target, re-quantized types chosen, the gains' base fingerprints hashed
   (:mod:`.fingerprint`) — before anything is written;
4. :func:`write_gguf` (:mod:`.writer`): the library's writer for the header (every
   key/value kept, provenance added, :mod:`.provenance`), the tensors streamed in;
5. :func:`verify_file` (:mod:`.verify`): every byte of an output accounted for.

Block types, the fold and the quantizers are :mod:`.quants`. The ``gguf`` library
is an optional extra, imported only inside functions (:mod:`.library`).

Trust rules are :mod:`gainsurgery.io`'s: inputs opened with ``open_regular``, the
output claimed and published with ``claim_file``, JSON read with ``jsonsafe``.
"""

from __future__ import annotations

import os

from gainsurgery.formats.gguf.engine import Measured, TensorReport, measure
from gainsurgery.formats.gguf.opening import GGUFFile, GGUFLimits, TensorEntry, open_gguf
from gainsurgery.formats.gguf.plan import DEFAULT_TOLERANCE, GGUFOptions, GGUFPlan, make_plan
from gainsurgery.formats.gguf.verify import GGUFVerifyReport, verify_file
from gainsurgery.formats.gguf.writer import write_gguf

#: The file suffix that makes a BASE (or OUT) a GGUF file.
SUFFIX = ".gguf"


def is_gguf(spec: str | os.PathLike[str] | None) -> bool:
    """True when a BASE or OUT argument names a GGUF file (it ends in ``.gguf``, any case).

    Example:
        >>> is_gguf("models/gemma-3-270m-Q4_K_M.gguf"), is_gguf("org/repo:model.GGUF"), is_gguf("base/")
        (True, True, False)
    """
    return spec is not None and os.fspath(spec).lower().endswith(SUFFIX)


__all__ = ["DEFAULT_TOLERANCE", "GGUFFile", "GGUFLimits", "GGUFOptions", "GGUFPlan", "GGUFVerifyReport", "Measured",
           "SUFFIX", "TensorEntry", "TensorReport", "is_gguf", "make_plan", "measure", "open_gguf", "verify_file",
           "write_gguf"]
