"""Mixed precision for training: weights in one dtype, compute in another, gains always float32.

Two separate choices, as in accelerate:

- ``--dtype`` is what the *frozen base weights* are stored in (``float32``,
  ``bfloat16``, ``float16``): it sets the model's memory.
- ``--mixed-precision`` (``no``, ``bf16``, ``fp16``) runs the forward pass under
  ``torch.autocast``: matrix products in half precision, reductions (softmax,
  norms, the loss) in float32, whatever the weights are stored in.

The *trainable* numbers never follow either: gain vectors (and PEFT adapters,
which PEFT upcasts) stay float32 parameters, so Adam's moments are float32 and a
step of 5e-3 on a gain of 1.0 is not rounded away (bfloat16 has 8 bits of
mantissa: 1.0 + 5e-3 rounds to 1.0). The hooks cast a gain to the activation's
dtype at use, and autograd casts its gradient back to float32.

fp16 needs loss scaling (its exponent range loses small gradients): a
``torch.amp.GradScaler`` is used for it, on CPU and CUDA alike. bf16 has
float32's range and needs none.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from gainsurgery.errors import TrainingError

#: The ``--mixed-precision`` choices (accelerate's names).
MIXED_PRECISION = ("no", "bf16", "fp16")


def resolve_mixed_precision(requested: str | None) -> str:
    """``requested``, or what ``accelerate launch`` asked for (its config/flags), or ``no``.

    Example:
        >>> resolve_mixed_precision("bf16")
        'bf16'
    """
    mode = requested if requested is not None else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    mode = (mode or "no").lower()
    if mode not in MIXED_PRECISION:
        raise TrainingError(f"unknown mixed precision {mode!r}; choose one of {', '.join(MIXED_PRECISION)}")
    return mode


def autocast(device: Any, mode: str):
    """A context that runs the forward pass of ``mode`` on ``device`` (a no-op for ``no``).

    Example:
        >>> import torch
        >>> with autocast(torch.device("cpu"), "bf16"):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16
    """
    import torch

    if mode == "no":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


def grad_scaler(device: Any, mode: str):
    """A loss scaler for fp16 (dynamic, torch's defaults), None otherwise."""
    if mode != "fp16":
        return None
    import torch

    return torch.amp.GradScaler(device.type)
