"""Model file formats other than safetensors checkpoints.

:mod:`gainsurgery.formats.gguf` applies gains straight onto GGUF files (llama.cpp,
Ollama, LM Studio), quantized or not, through the ``gguf`` library.
"""
