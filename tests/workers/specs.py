"""The workers' `tag=folder[:quantize]` arguments: each loaded as this rank's model (quantized on
the fly when `:int8` / `:int4` is given), float32, with the cache size the worker asks for."""
import torch

from llama_demo.weights.loading import load_model


def models(specs: list[str], info, max_seq_len: int, max_batch_size: int):
    """Yield (tag, model) for each spec, one at a time."""
    for spec in specs:
        tag, rest = spec.split("=", 1)
        folder, _, quantize = rest.partition(":")
        yield tag, load_model(folder, info, dtype=torch.float32, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                              progress=False, quantize=quantize or None)
