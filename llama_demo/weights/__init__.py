"""Weights on disk: Meta checkpoints, loading a rank's slice, GGUF and Hugging Face import, quantize, download."""
