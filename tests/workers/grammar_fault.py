"""Run under torchrun by tests/test_structured.py: a mask that disagrees with the grammar's parser
(Matcher.allowed patched to allow every token, as a broken vocabulary bridge would) beside an
unconstrained request, on a random-weight model; writes OUT/fault{rank}.json.

    argv: ckpt_dir out_dir"""
import json
import sys
from pathlib import Path

import torch

from llama_demo.text.tokenizer import find_tokenizer
from llama_demo.engine import grammar
from llama_demo.engine.engine import Engine, Request
from llama_demo.engine.sampler import SamplingParams
from llama_demo.model.parallel import init_distributed, shutdown_distributed
from llama_demo.text.tokenizer import load_tokenizer
from llama_demo.weights.loading import load_model

ckpt, out = Path(sys.argv[1]), Path(sys.argv[2])
info = init_distributed()
model = load_model(ckpt, info, dtype=torch.float32, max_seq_len=256, max_batch_size=2)
tok = load_tokenizer(find_tokenizer(ckpt, None))
engine = Engine(model, tok, info.rank, info.world_size, info.device, seed=0)
true_mask = grammar.Matcher.allowed
grammar.Matcher.allowed = lambda self, device="cpu": torch.ones(self.n_vocab, dtype=torch.bool, device=device) \
    if self.fault is None else true_mask(self, device)
any_object = grammar.response_format_grammar({"type": "json_object"})
prompt = [1, 17, 250, 33, 8]
done = engine.generate([Request("lying-mask", prompt, SamplingParams(temperature=0.0, max_new_tokens=40, grammar=any_object)),
                        Request("free", prompt, SamplingParams(temperature=0.0, max_new_tokens=20))])
out.mkdir(parents=True, exist_ok=True)
(out / f"fault{info.rank}.json").write_text(json.dumps({k: [v[0], v[1], v[2]] for k, v in done.items()}))
shutdown_distributed()
