"""What the converters into Meta's layout share (params.json + consolidated.NN.pth, with the
tokenizer beside them): their error, their version, the FFN size's params.json fields, the stored
dtype, the sharded save. The sources live beside this module: gguf.py (llama.cpp's GGUF files;
quantized tensors are dequantized) and hf.py (Hugging Face LlamaForCausalLM folders);
default_model.py converts the embedded default model; the command line is commands/convert.py.

What a converted folder holds: Meta's tensor names and Meta's interleaved rotary layout (the split
table and save_sharded live in checkpoint.py), and either `tokenizer.model` (SentencePiece /
tiktoken, copied) or `tokenizer.json` (Hugging Face tokenizers) + `tokenizer_config.json` with
`bos_token`, `eos_token`, `add_bos_token` and `chat_template`. A `tokenizer.json` written here
never adds BOS itself: `add_bos_token` says whether the caller should.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from .checkpoint import save_sharded
from ..config import ConfigError, ModelArgs
from ..model.parallel import DTYPES


class ConvertError(ConfigError):
    """The source cannot be converted; the message names the file and what to do."""


# Bump when the converter's output changes, so default_model_dir() redoes cached conversions.
CONVERTER_VERSION = 1


def ffn_params(dim: int, ffn_hidden: int) -> dict:
    """multiple_of / ffn_dim_multiplier for which ModelArgs.ffn_hidden gives exactly `ffn_hidden`.

    Meta's params.json has no field for the FFN size; it is derived from dim (see ModelArgs), so
    we search for the simplest pair that reproduces the source's size and check it through
    ModelArgs itself rather than restating the formula.
    """
    def hidden(multiple_of: int, mult: float | None) -> int:
        return ModelArgs(dim=dim, n_layers=1, n_heads=1, multiple_of=multiple_of, ffn_dim_multiplier=mult).ffn_hidden

    sizes = [m for m in (256, 1024, 4096, 128, 64, 32, 16, 8, 4, 2, 1) if ffn_hidden % m == 0]
    for m in sizes:
        if hidden(m, None) == ffn_hidden:
            return {"multiple_of": m, "ffn_dim_multiplier": None}
    base = int(2 * 4 * dim / 3)
    for m in sizes:
        for digits in range(1, 9):  # the shortest decimal multiplier that rounds to the size
            mult = round(ffn_hidden / base, digits)
            if mult > 0 and hidden(m, mult) == ffn_hidden:
                return {"multiple_of": m, "ffn_dim_multiplier": mult}
    mult = (ffn_hidden + 0.5) / base
    if hidden(1, mult) == ffn_hidden:
        return {"multiple_of": 1, "ffn_dim_multiplier": mult}
    raise ConvertError(f"no multiple_of / ffn_dim_multiplier gives an FFN size of {ffn_hidden} for dim {dim}")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def save_converted(state: Mapping[str, torch.Tensor], args: ModelArgs, out_dir: Path, shards: int, extra: dict) -> None:
    args.validate()
    args.check_world_size(shards)
    if args.vocab_size % shards:  # output.weight is split by rows; loaders need equal slices
        raise ConvertError(f"{shards} shards cannot split the vocabulary of {args.vocab_size} evenly; choose a divisor")
    save_sharded(state, args, out_dir, shards, extra_params=extra)  # type: ignore[arg-type]
