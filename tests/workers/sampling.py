"""Run under torchrun by tests/test_engine_sampling.py: OpenAI's penalties and logit_bias, and the
chat page's repeat guard, in the real engine; rank 0 writes OUT/sampling.json."""
import json
import sys
from pathlib import Path

import torch

from llama_demo.engine.engine import Engine, Request
from llama_demo.engine.sampler import SamplingParams
from llama_demo.model.parallel import init_distributed, shutdown_distributed
from llama_demo.text.tokenizer import load_tokenizer
from llama_demo.weights.loading import load_model

ckpt, out, prompt = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
info = init_distributed()
model = load_model(ckpt, info, dtype=torch.float32, max_seq_len=128, max_batch_size=4)
engine = Engine(model, load_tokenizer(ckpt), info.rank, info.world_size, info.device)
notes = {}
done = engine.generate([
    Request("penalized", prompt, SamplingParams(temperature=0.0, max_new_tokens=12, presence_penalty=1.5,
                                                frequency_penalty=2.0, logit_bias=[[9, 3.0], [5, -100.0]])),
    Request("loop", prompt, SamplingParams(temperature=0.0, max_new_tokens=100, repeat_guard=16,
                                           logit_bias=[[7, 100.0]])),
], on_event=lambda ev: notes.update({ev.request_id: ev.note}) if ev.finished else None)
if info.rank == 0:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampling.json").write_text(json.dumps({k: [v[0], v[2], notes[k]] for k, v in done.items()}))
shutdown_distributed()
