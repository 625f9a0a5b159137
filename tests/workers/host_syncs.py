"""Run by tests/test_host_syncs.py (one rank, a plain process): counts the host syncs of one
decode step of a batch with mixed sampling params (greedy, temperature, top-p, top-k, min-p,
a seed, penalties). A host sync is any read of a tensor's values into Python: Tensor.item,
tolist, __bool__, __int__ (and __float__, __index__). Prints one JSON line {"syncs": n, "where": [...]}."""
import json
import sys
import traceback
from pathlib import Path

import torch

from llama_demo.engine.engine import Engine, Request
from llama_demo.engine.sampler import SamplingParams
from llama_demo.model.parallel import init_distributed, shutdown_distributed
from llama_demo.text.tokenizer import load_tokenizer
from llama_demo.weights.loading import load_model

ckpt = Path(sys.argv[1])
info = init_distributed()
model = load_model(ckpt, info, dtype=torch.float32, max_seq_len=128, max_batch_size=8)
engine = Engine(model, load_tokenizer(ckpt), info.rank, info.world_size, info.device, seed=0)
mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_p=0.9),
         SamplingParams(temperature=1.0, top_k=20, seed=7), SamplingParams(temperature=0.7, min_p=0.05),
         SamplingParams(temperature=0.9, top_p=0.5, top_k=5, repetition_penalty=1.2, presence_penalty=0.5),
         SamplingParams(temperature=0.0, logit_bias=[[3, 2.0]])]
for i, p in enumerate(mixed):
    p.max_new_tokens = 50
    engine.add(engine.check(Request(f"r{i}", [1, 5 + i, 9, 12, 40 + i], p)))
while engine.waiting or any(not s.out_ids for s in engine.running.values()):
    engine.step()
engine.step()  # one plain decode step first: caches and plans warm

where = []
names = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__"]
originals = {n: getattr(torch.Tensor, n) for n in names}


def counting(name):
    original = originals[name]

    def wrapped(self, *args, **kw):
        where.append(f"{name}: " + " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                               for f in reversed(traceback.extract_stack(limit=6)[:-1])))
        return original(self, *args, **kw)
    return wrapped


assert len(engine.running) == len(mixed) and not engine.waiting
for n in names:
    setattr(torch.Tensor, n, counting(n))
try:
    events = engine.step()
finally:
    for n, f in originals.items():
        setattr(torch.Tensor, n, f)
assert len(events) == len(mixed), events
print(json.dumps({"syncs": len(where), "where": where}))
shutdown_distributed()
