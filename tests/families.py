"""Tiny random-weight checkpoints with the real tokenizers of the model families we serve, as
their folders come: Meta's Llama 2 (SentencePiece tokenizer.model one level up, params.json
vocab_size -1), Meta's Llama 3.1 (tiktoken tokenizer.model from llama-models' wheel, scaled
rotary) and the default model (SmolLM2's tokenizer.json and ChatML template). Narrow (dim 32) so
that even a 128k vocabulary stays a few tens of MB."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import LLAMA2_TOKENIZER, random_state
from llama_demo.config import ModelArgs
from llama_demo.weights.checkpoint import save_sharded

FAMILIES = ("llama2", "llama31", "default")
SHAPE = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, norm_eps=1e-5)


def llama3_tokenizer_path() -> Path:
    import llama_models

    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def family_checkpoint(base: Path, family: str, n_shards: int = 2, seed: int = 0) -> Path:
    """The model folder to pass as --ckpt_dir (skips the test where a tokenizer file is absent)."""
    extra = {}
    if family == "llama2":
        if not LLAMA2_TOKENIZER.is_file():
            pytest.skip(f"{LLAMA2_TOKENIZER} is absent")
        folder, vocab, shape = base / "llama2" / "7B", 32000, dict(SHAPE, n_kv_heads=None)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(LLAMA2_TOKENIZER, folder.parent / "tokenizer.model")
        extra = {"vocab_size": -1}  # as Llama 2's params.json: the tokenizer says
    elif family == "llama31":
        folder, vocab = base / "Llama3.1-8B-Instruct", 128256
        shape = dict(SHAPE, rope_theta=500000.0, use_scaled_rope=True)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(llama3_tokenizer_path(), folder / "tokenizer.model")
    elif family == "default":
        from llama_demo.weights.default_model import default_model_dir

        source = default_model_dir()
        folder, vocab, shape = base / "smollm2", 49152, dict(SHAPE, n_heads=6, n_kv_heads=2, dim=48)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(source / name, folder / name)
    else:
        raise ValueError(family)
    args = ModelArgs(**shape, vocab_size=vocab)
    save_sharded(random_state(args, seed), args, folder, n_shards, extra_params=extra)
    return folder


# One 2-rank chat server per family, shared by every module that talks to one (the SDK fronts,
# LangChain): a launch costs ~30 s of the CI's 2 cores. A context long enough for Meta's tool
# prompt beside a client's schema; two rows so a test may hold one while another runs.
SERVER_FLAGS = ("--chat", "--max_seq_len", "1024", "--max_batch_size", "2")


def family_server(family: str, base: Path):
    """A started server of `family`'s folder under `base` (the caller stops it)."""
    from test_server import Server

    s = Server(family_checkpoint(base, family, n_shards=2), 2, *SERVER_FLAGS)
    try:
        s.wait_healthy(180)
    except BaseException:
        s.stop()
        raise
    return s
