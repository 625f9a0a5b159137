"""Run under torchrun by tests/test_meta_reference.py: for each checkpoint folder given, load our
model on this rank count and write rank 0's logits for the prompt: a prefill of all tokens but
the last, then one decode step with the last (the same two calls the reference made).

    argv: out_dir prompt_json folder...
"""
import json
import sys
from pathlib import Path

import torch

from llama_demo.model.parallel import init_distributed, shutdown_distributed
from llama_demo.weights.loading import load_model

out, prompt, folders = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3:]
info = init_distributed()
tokens = torch.tensor(prompt)
B, T = tokens.shape[0], tokens.shape[1] - 1
for i, folder in enumerate(folders):
    model = load_model(folder, info, dtype=torch.float32, max_seq_len=64, max_batch_size=B, progress=False)
    prefill = model(tokens[:, :T], torch.arange(T).expand(B, T), slice(0, B), T)
    decode = model(tokens[:, T:], torch.full((B, 1), T), slice(0, B), T + 1)
    if info.rank == 0:
        torch.save({"prefill": prefill.clone(), "decode": decode.clone(), "args": vars(model.args)}, out / f"{i}.pt")
shutdown_distributed()
