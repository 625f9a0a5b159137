"""Run under torchrun by the tests: each rank writes its last-position logits for a fixed prompt
and the greedy tokens the engine generates for a batch of prompts."""
import json
import sys
from pathlib import Path

import torch

from llama_demo.model.parallel import init_distributed, shutdown_distributed
from llama_demo.engine.engine import Engine, Request
from llama_demo.weights.loading import load_model
from llama_demo.engine.sampler import SamplingParams
from llama_demo.text.tokenizer import load_tokenizer

ckpt, out, prompts_json, n_new = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
prompts = json.loads(prompts_json)  # lists of token ids
info = init_distributed()
model = load_model(ckpt, info, dtype=torch.float32, max_seq_len=256, max_batch_size=8)
ids = torch.tensor([prompts[0]])
logits = model(ids, torch.arange(ids.shape[1])[None], slice(0, 1), ids.shape[1], logits_at=torch.tensor([ids.shape[1] - 1]))
engine = Engine(model, load_tokenizer(ckpt), info.rank, info.world_size, info.device)
params = SamplingParams(temperature=0.0, max_new_tokens=n_new)
batch = engine.generate([Request(i, p, params) for i, p in enumerate(prompts)])
batch_steps = engine.steps
# Prompts prefilled 3 tokens per step, interleaved with the others' decoding: the same tokens.
chunked_engine = Engine(model, load_tokenizer(ckpt), info.rank, info.world_size, info.device, step_tokens=3)
chunked = chunked_engine.generate([Request(i, p, params) for i, p in enumerate(prompts)])
penalized = engine.generate([Request(0, prompts[0], SamplingParams(temperature=0.0, repetition_penalty=1.3,
                                                                  max_new_tokens=n_new))])
sampled = engine.generate([Request(0, prompts[0], SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=n_new))])
# Continuous batching with a hole: "b" finishes early, leaving cache rows 0 and 2 running
# apart; "d" joins later into the freed row. Each must still get its tokens alone.
churn = {k: [] for k in "abcd"}
for rid, p, n in (("a", prompts[0], n_new), ("b", prompts[1], 3), ("c", prompts[2], n_new)):
    engine.add(Request(rid, p, SamplingParams(temperature=0.0, max_new_tokens=n)))
while not engine.idle:
    for ev in engine.step():
        if ev.token_id is not None and not ev.stop_id:
            churn[ev.request_id].append(ev.token_id)
    if len(churn["a"]) == 8:
        engine.add(Request("d", prompts[1], params))
out.mkdir(parents=True, exist_ok=True)
torch.save(logits[0].cpu().clone(), out / f"logits{info.rank}.pt")
(out / f"tokens{info.rank}.json").write_text(json.dumps({
    "batch": [batch[i][0] for i in range(len(prompts))], "sampled": sampled[0][0], "churn": churn,
    "chunked": [chunked[i][0] for i in range(len(prompts))], "penalized": penalized[0][0],
    "steps": {"batch": batch_steps, "chunked": chunked_engine.steps}}))
shutdown_distributed()
