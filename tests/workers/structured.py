"""Run under torchrun by tests/test_structured.py: greedy and sampled answers constrained by a JSON
schema's grammar, on a random-weight model, written to OUT/structured{rank}.json. With a chat
format for the folder, the prompt is a chat prompt (the answer's first token follows the
assistant's header, as on the server); else fixed ids.

    argv: ckpt_dir out_dir schema_json"""
import json
import sys
from pathlib import Path

import torch

from llama_demo.text.tokenizer import find_tokenizer
from llama_demo.engine.engine import Engine, Request
from llama_demo.engine.grammar import response_format_grammar
from llama_demo.engine.sampler import SamplingParams
from llama_demo.model.parallel import init_distributed, shutdown_distributed
from llama_demo.text.chat_format import Message, chat_format_for
from llama_demo.text.tokenizer import load_tokenizer
from llama_demo.weights.loading import load_model

ckpt, out, schema = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
info = init_distributed()
model = load_model(ckpt, info, dtype=torch.float32, max_seq_len=1024, max_batch_size=5)
tok = load_tokenizer(find_tokenizer(ckpt, None))
fmt = chat_format_for(ckpt, tok)
engine = Engine(model, tok, info.rank, info.world_size, info.device, seed=0)
if fmt is not None:  # the format's end of turn ends answers, as the server sets it
    engine.stop_ids = frozenset(fmt.stop_ids)
    prompt = fmt.encode_dialog([Message("user", "Answer in JSON.")])
else:
    prompt = [1, 17, 250, 33, 8]
grammar = response_format_grammar({"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
any_object = response_format_grammar({"type": "json_object"})
requests = [Request("greedy", prompt, SamplingParams(temperature=0.0, max_new_tokens=160, grammar=grammar)),
            Request("hot", prompt, SamplingParams(temperature=1.0, max_new_tokens=160, grammar=grammar, seed=3)),
            # json_object bounds nothing: a random model's strings end by chance, so it gets room
            Request("object", prompt, SamplingParams(temperature=1.0, max_new_tokens=900, grammar=any_object, seed=4)),
            Request("object-greedy", prompt, SamplingParams(temperature=0.0, max_new_tokens=900, grammar=any_object)),
            Request("free", prompt, SamplingParams(temperature=0.0, max_new_tokens=20))]
done = engine.generate(requests)
out.mkdir(parents=True, exist_ok=True)
(out / f"structured{info.rank}.json").write_text(json.dumps({k: [v[0], v[1], v[2]] for k, v in done.items()}))
shutdown_distributed()
