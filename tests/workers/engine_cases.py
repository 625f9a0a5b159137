"""Run under torchrun by tests/test_engine.py: the engine's lock-step cases on every rank.

Each rank writes what it saw (tokens, finish reasons, texts) to OUT/cases{rank}.json; the test
compares ranks with each other and with transformers' greedy tokens."""
import json
import sys
from pathlib import Path

import torch

from llama_demo.engine.engine import Engine, Request
from llama_demo.engine.sampler import SamplingParams
from llama_demo.model.parallel import init_distributed, shutdown_distributed
from llama_demo.text.tokenizer import load_tokenizer
from llama_demo.weights.loading import load_model

ckpt, out, prompts, n_new = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
info = init_distributed()
model = load_model(ckpt, info, dtype=torch.float32, max_seq_len=128, max_batch_size=2)  # two running at most: requests wait
BLOCK = 4  # small KV blocks: these short prompts share some, and answers cross many block boundaries
model.setup_cache(2, 128, info.device, torch.float32, block_size=BLOCK)
tok = load_tokenizer(ckpt)
greedy = SamplingParams(temperature=0.0, max_new_tokens=n_new)


def run(engine, plan):
    """plan: {step number: [("add", id, prompt, params) | ("cancel", id)]}; every rank applies
    the same actions at the same step, as the serving loop's seal makes them."""
    toks, reasons, texts, reused, step = {}, {}, {}, {}, 0
    while True:
        for action in plan.get(step, []):
            if action[0] == "add":
                engine.add(engine.check(Request(action[1], action[2], action[3])))
                toks[action[1]], texts[action[1]] = [], ""
            else:
                for ev in engine.cancel(action[1]):
                    reasons[ev.request_id] = ev.finish_reason
        if engine.idle and step > max(plan):
            break
        for ev in engine.step():
            if ev.token_id is not None and not ev.stop_id:
                toks[ev.request_id].append(ev.token_id)
            texts[ev.request_id] += ev.text
            reused[ev.request_id] = ev.reused
            if ev.finished:
                reasons[ev.request_id] = ev.finish_reason
        step += 1
    return {"tokens": toks, "reasons": reasons, "texts": texts, "reused": reused}


cases = {}
engine = Engine(model, tok, info.rank, info.world_size, info.device, seed=1234)
# five requests, two running at most: three wait, each still gets its own greedy tokens
cases["more_than_rows"] = run(engine, {0: [("add", f"p{i}", p, greedy) for i, p in enumerate(prompts)]})
# a cancel in the middle frees a row that a later request takes
cases["cancel"] = run(engine, {0: [("add", "a", prompts[0], greedy), ("add", "b", prompts[1], greedy)],
                               4: [("cancel", "b")], 5: [("add", "c", prompts[2], greedy)]})
# a seeded request draws the same tokens alone and in company
seeded = SamplingParams(temperature=1.0, max_new_tokens=n_new, seed=2**64 - 5)
cases["seed_alone"] = run(engine, {0: [("add", "s", prompts[0], seeded)]})
cases["seed_batched"] = run(engine, {0: [("add", "x", prompts[1], SamplingParams(temperature=1.0, max_new_tokens=n_new)),
                                         ("add", "s", prompts[0], seeded)]})
# a stop string: rank 0 finds it in the text and every rank ends the request at the same token
solo = cases["more_than_rows"]
stop_text = next(t for i in range(6, n_new - 1) if (t := tok.decode(solo["tokens"]["p0"][i:i + 2])).strip())
cases["stop_text"] = stop_text
cases["stop"] = run(engine, {0: [("add", "t", prompts[0], SamplingParams(temperature=0.0, max_new_tokens=n_new,
                                                                           stop=[stop_text]))]})

# a fault in one request's text (rank 0's tokenizer fails on one token id) ends that request
# alone, on every rank; its neighbour gets all its tokens
innocent = set(solo["tokens"]["p0"] + prompts[0] + prompts[1][-4:])
bad_id = next(t for t in solo["tokens"]["p1"][2:] if t not in innocent)
cases["bad_id"] = bad_id


class FailingDecode:
    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def decode(self, ids):
        if bad_id in ids:
            raise RuntimeError("decoder exploded")
        return self._inner.decode(ids)


faulty = Engine(model, FailingDecode(tok) if info.rank == 0 else tok, info.rank, info.world_size, info.device)
if info.rank != 0:  # followers never detokenize: prove it by taking their tokenizer's decode away
    faulty.tokenizer = None
cases["fault"] = run(faulty, {0: [("add", "ok", prompts[0], greedy), ("add", "bad", prompts[1], greedy)]})

# Prefix reuse: a conversation's next turn (its prompt = the last prompt + the answer's start +
# new tokens) prefills only what is new; the same requests on an engine without reuse agree.
def conversation(engine):
    first = run(engine, {0: [("add", "t1", prompts[0], greedy)]})
    turn2 = prompts[0] + first["tokens"]["t1"][:5] + [7, 8, 9]  # the prefix ends inside the answer
    second = run(engine, {0: [("add", "t2", turn2, greedy)]})
    # two other conversations run (the pool has room: turn 2's cached blocks stay); then turn 3
    others = run(engine, {0: [("add", "o1", prompts[3], greedy), ("add", "o2", prompts[4], greedy)]})
    turn3 = turn2 + second["tokens"]["t2"][:3] + [11]
    third = run(engine, {0: [("add", "t3", turn3, greedy)]})
    # a cancelled request's blocks: its prompt and partial answer are reused by the next request
    cancelled = run(engine, {0: [("add", "c1", prompts[1], greedy)], 3: [("cancel", "c1")]})
    after = prompts[1] + cancelled["tokens"]["c1"][:1] + [12, 13]
    resumed = run(engine, {0: [("add", "c2", after, greedy)]})
    return {"prompts": {"t2": turn2, "t3": turn3, "c2": after},
            "runs": [first, second, others, third, cancelled, resumed]}


cases["reuse_on"] = conversation(Engine(model, tok, info.rank, info.world_size, info.device))
cases["reuse_off"] = conversation(Engine(model, tok, info.rank, info.world_size, info.device, prefix_cache=False))
cases["block"] = BLOCK

# Preemption: four requests running at once in a pool of 20 blocks of 4 positions, where each
# needs up to 9: the youngest are preempted as the answers grow (their blocks given back, prefilled
# again later from prompt and answer so far) and still get their own greedy tokens.
model.setup_cache(4, 80, info.device, torch.float32, kv_tokens=80, block_size=BLOCK)
tight = Engine(model, tok, info.rank, info.world_size, info.device)
cases["preempt"] = run(tight, {0: [("add", f"p{i}", p, greedy) for i, p in enumerate(prompts[:4])]})
cases["preemptions"] = tight.scheduler.preempted_total

out.mkdir(parents=True, exist_ok=True)
(out / f"cases{info.rank}.json").write_text(json.dumps(cases))
shutdown_distributed()
