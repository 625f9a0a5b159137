"""Run under torchrun by tests/test_speculative.py: the same requests with and without speculative
decoding in the real engine, on every rank, with each proposer: n-gram lookup, a draft model
identical to the target (its proposals stand), a draft of other random weights (they mostly fall),
and the target's own weights quantized to int8; rank 0 writes OUT/speculative.json.

The proposers' costs are set flat, so they propose wherever they can: the test is about
exactness, not about when speculation pays."""
import json
import sys
from pathlib import Path

import torch

from llama_demo.engine.engine import Engine, Request
from llama_demo.engine.sampler import SamplingParams
from llama_demo.engine.speculative import SpeculationConfig, StepCosts
from llama_demo.model.parallel import init_distributed, shutdown_distributed
from llama_demo.text.tokenizer import load_tokenizer
from llama_demo.weights.loading import load_model

ckpt, other, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
info = init_distributed()
model = load_model(ckpt, info, dtype=torch.float32, max_seq_len=192, max_batch_size=4)
model.setup_cache(4, 192, info.device, torch.float32, block_size=4)  # answers cross many block boundaries
tok = load_tokenizer(ckpt)
base = [1, 17, 250, 33, 8, 120, 45, 17, 250, 33, 91, 60]
prompts = {"a": base * 2, "b": base[3:] + base, "c": [5, 6, 7, 8] * 5}


def draft_model(folder: Path, quantize: str | None = None):
    """A draft checkpoint gets a pool of its own; the target's own weights quantized (a self-draft,
    as the server's start-up does it) read and write the target's pool."""
    d = load_model(folder, info, dtype=torch.float32, max_seq_len=192, max_batch_size=4, quantize=quantize)
    if quantize:
        d.share_cache(model)
    else:
        d.setup_cache(4, 192, info.device, torch.float32, kv_tokens=model.kv_blocks * 4, block_size=4)
    fed = [0]  # tokens fed to the draft, in all
    step = d.step

    def counted(tokens, *args, **kw):
        fed[0] += len(tokens)
        return step(tokens, *args, **kw)

    d.step, d.fed = counted, fed
    return d


def engine(spec: str | None, prefix_cache: bool = True, draft=None) -> Engine:
    e = Engine(model, tok, info.rank, info.world_size, info.device, seed=0, step_tokens=64, prefix_cache=prefix_cache,
               speculation=SpeculationConfig(spec, 4) if spec else None, draft=draft)
    if spec:
        e.proposer.costs = StepCosts(lambda rows, proposed: 1.0, lambda rows: 0.0)
    return e


def run(e: Engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    seen = {}

    def note(ev):
        if ev.logprob is not None:
            seen.setdefault(ev.request_id, []).append(ev.logprob)

    done = e.generate([Request(k, p, params) for k, (p, params) in requests.items()], on_event=note)
    return {k: {"ids": v[0], "text": v[1], "reason": v[2], "logprobs": seen.get(k)} for k, v in done.items()}


def greedy(n: int = 40, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, **kw)


cases = {
    "plain": {k: (p, greedy()) for k, p in prompts.items()},
    "penalties": {k: (p, greedy(presence_penalty=0.4, frequency_penalty=0.3, repetition_penalty=1.2,
                                 logit_bias=[[33, 2.0], [60, -5.0]])) for k, p in prompts.items()},
    "logprobs": {k: (p, greedy(logprobs=2)) for k, p in prompts.items()},
    "odd_length": {k: (p, greedy(7)) for k, p in prompts.items()},
    "min_p_top_k_greedy": {k: (p, greedy(min_p=0.1, top_k=5)) for k, p in prompts.items()},
}
plain_engine = engine(False)
result = {"plain": {name: run(plain_engine, reqs) for name, reqs in cases.items()}}
# a stop string from the plain answer's own text: both runs must stop at the same place
text = tok.decode(result["plain"]["plain"]["a"]["ids"])  # every rank alike (only rank 0 sees answers' text)
stop = text[len(text) // 2: len(text) // 2 + 3]
cases["stop"] = {"a": (prompts["a"], greedy(stop=[stop]))}
result["plain"]["stop"] = run(plain_engine, cases["stop"])
result["stop_string"] = stop

sampled = {k: (p, SamplingParams(temperature=0.9, top_p=0.9, top_k=50, min_p=0.02, seed=7 + i, max_new_tokens=40,
                                 frequency_penalty=0.2))
           for i, (k, p) in enumerate(prompts.items())}
proposers = {"ngram": (None, None), "draft_same": ("draft", ckpt), "draft_other": ("draft", other),
             "int8": ("int8", ckpt)}
for name, (method, folder) in proposers.items():
    draft = None if folder is None else draft_model(folder, "int8" if method == "int8" else None)
    spec_engine = engine(method or "ngram", draft=draft)
    got = {"spec": {}}
    for case, reqs in cases.items():
        got["spec"][case] = run(spec_engine, reqs)
        if case == "plain":  # greedy with no adjustment: what a draft identical to the target gets right
            c = spec_engine.proposer.counters
            got["plain_counters"] = {"proposed": c.proposed, "accepted": c.accepted}
    got["sampled"] = [run(spec_engine, sampled), run(spec_engine, sampled)]
    # the blocks named after speculation hold accepted tokens only: a prompt that extends an answer
    # reuses them and continues as a fresh engine without any cache does
    answer = got["spec"]["plain"]["a"]["ids"]
    extended = {"x": (prompts["a"] + answer[:21], greedy(20))}
    got["reuse"] = {"spec": run(spec_engine, extended), "fresh": run(engine(None, prefix_cache=False), extended)}
    c = spec_engine.proposer.counters
    got["counters"] = {"verifications": c.verifications, "proposed": c.proposed, "accepted": c.accepted,
                       "emitted": c.emitted}
    got["blocks_held_after"] = spec_engine.scheduler.pool.used
    if draft is not None:
        got["draft_fed"], got["shares_cache"] = draft.fed[0], spec_engine.proposer.shares_cache
    result[name] = got
if info.rank == 0:
    out.mkdir(parents=True, exist_ok=True)
    (out / "speculative.json").write_text(json.dumps(result))
shutdown_distributed()
