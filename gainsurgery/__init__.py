"""gainsurgery: GAIN model surgery (arXiv 2604.04516).

Train, share, stack and apply diagonal gain vectors ``W_new = W · diag(s)`` on
causal language models, streaming over sharded safetensors checkpoints.
"""

__version__ = "0.1.0"

from gainsurgery.errors import GainSurgeryError  # noqa: E402

__all__ = ["GainSurgeryError", "__version__"]
