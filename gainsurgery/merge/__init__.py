"""The pure pieces of an apply: plan -> kernel -> stream -> verify -> provenance.

- :mod:`~gainsurgery.merge.plan`: which tensors a gain scales and how (headers only);
- :mod:`~gainsurgery.merge.kernel`: the scaling of raw tensor bytes, block by block;
- :mod:`~gainsurgery.merge.stream`: shards streamed through the kernel into files,
  hashed as they are written;
- :mod:`~gainsurgery.merge.verify`: every byte of an output checked against the plan;
- :mod:`~gainsurgery.merge.provenance`: the ``gainsurgery.json`` record.

Applying (opening the base, claiming OUT or pushing, the checks, the sinks) is
:mod:`gainsurgery.applying`; users call :func:`gainsurgery.api.apply`.
"""

from __future__ import annotations

from gainsurgery.merge.kernel import DEFAULT_CHUNK_BYTES
from gainsurgery.merge.plan import Plan, TensorOp, make_plan
from gainsurgery.merge.verify import VerifyReport, verify

__all__ = ["DEFAULT_CHUNK_BYTES", "Plan", "TensorOp", "VerifyReport", "make_plan", "verify"]
