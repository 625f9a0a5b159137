"""Run under torchrun by tests/test_lm_eval.py: prompt and answer logprobs of one request whose
prompt is prefilled 3 tokens a step while another request decodes, written by rank 0."""
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
engine = Engine(model, load_tokenizer(ckpt), info.rank, info.world_size, info.device, step_tokens=3)
events = []
engine.generate([Request("other", prompt[:4], SamplingParams(temperature=0.0, max_new_tokens=12)),
                 Request("scored", prompt, SamplingParams(temperature=0.0, max_new_tokens=4, logprobs=2,
                                                          prompt_logprobs=2))], on_event=events.append)
mine = [e for e in events if e.request_id == "scored"]
out.mkdir(parents=True, exist_ok=True)
(out / f"logprobs{info.rank}.json").write_text(json.dumps({
    "ids": [e.token_id for e in mine], "logprobs": [e.logprob for e in mine],
    "top": [e.top_logprobs for e in mine], "prompt": mine[0].prompt_logprobs}))
shutdown_distributed()
