"""Run under torchrun by tests/test_structured.py: greedy and sampled answers constrained by a JSON
schema's grammar, on a random-weight model, written to OUT/structured{rank}.json."""
import json
import sys
from pathlib import Path

import torch

from llama_demo.engine.engine import Engine, Request
from llama_demo.engine.grammar import response_format_grammar
from llama_demo.engine.sampler import SamplingParams
from llama_demo.model.parallel import init_distributed, shutdown_distributed
from llama_demo.text.tokenizer import load_tokenizer
from llama_demo.weights.loading import load_model

ckpt, out, schema = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
info = init_distributed()
model = load_model(ckpt, info, dtype=torch.float32, max_seq_len=256, max_batch_size=4)
engine = Engine(model, load_tokenizer(ckpt), info.rank, info.world_size, info.device, seed=0)
grammar = response_format_grammar({"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
any_object = response_format_grammar({"type": "json_object"})
prompt = [1, 17, 250, 33, 8]
requests = [Request("greedy", prompt, SamplingParams(temperature=0.0, max_new_tokens=120, grammar=grammar)),
            Request("hot", prompt, SamplingParams(temperature=1.0, max_new_tokens=120, grammar=grammar, seed=3)),
            Request("object", prompt, SamplingParams(temperature=0.7, max_new_tokens=120, grammar=any_object, seed=4)),
            Request("free", prompt, SamplingParams(temperature=0.0, max_new_tokens=20))]
done = engine.generate(requests)
out.mkdir(parents=True, exist_ok=True)
(out / f"structured{info.rank}.json").write_text(json.dumps({k: [v[0], v[1], v[2]] for k, v in done.items()}))
shutdown_distributed()
