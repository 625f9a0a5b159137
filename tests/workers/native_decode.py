"""Run under torchrun by tests/test_native_decode.py: for each `tag=folder[:quantize]` argument,
decode a few steps of three sequences (cache rows 0, 2 and 3, in one batch) and of one, each
step twice from the same cache: through the C decode step (model/native_decode.py) and through the
torch ops every other step takes. Writes the largest logit and cache differences per model."""
import json
import sys
from pathlib import Path

import torch

from llama_demo.model import cpu_kernels
from llama_demo.model.native_decode import DecodePlan
from llama_demo.model.parallel import init_distributed, shutdown_distributed
from specs import models

out = Path(sys.argv[1])
info = init_distributed()
report = {}
# float32 products of 8 rows or more through torch's sgemm inside the C layers (normally only
# above c_rows_limit(), 32-64 rows, which these small steps never reach), so the prompt chunk
# below tests that path wherever torch has MKL
BLAS = cpu_kernels.lend_blas()
if BLAS:
    cpu_kernels.native().qk_set_sgemm(cpu_kernels.torch_sgemm(), 8)
# 6 rows: more than the C product's tile, so a float32 plan runs its probe (native_decode.float_rows_limit)
for tag, model in models(sys.argv[2:], info, max_seq_len=64, max_batch_size=6):
    g = torch.Generator().manual_seed(0)
    vocab = model.args.vocab_size
    rows, lengths = [0, 2, 3], [5, 11, 23]  # different positions in one step
    for row, n in zip(rows, lengths):
        model(torch.randint(3, vocab, (1, n), generator=g), torch.arange(n)[None], [row], n)  # prefill (torch ops)
    caches = [(layer.attention.cache_k, layer.attention.cache_v) for layer in model.layers]
    before = [(k.clone(), v.clone()) for k, v in caches]
    probed = DecodePlan.for_model(model)  # the probe steps write a cache position and put it back
    kept = all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(caches, before))
    worst = {"logits": 0.0, "cache": 0.0, "scale": 0.0, "plan": [], "probe_kept_cache": kept,
             "max_rows": probed.max_rows}
    for step in range(6):
        batch = rows if step < 4 else [2]  # then one sequence alone: a batch-1 step
        pos = torch.tensor([[lengths[rows.index(r)] + step] for r in batch])
        tokens = torch.randint(3, vocab, (len(batch), 1), generator=g)
        saved = [(k.clone(), v.clone()) for k, v in caches]
        results = []
        for native in (True, False):
            for (k, v), (k0, v0) in zip(caches, saved):
                k.copy_(k0), v.copy_(v0)
            model._decode_plan = None if native else False  # False: this step takes the torch ops
            logits = model(tokens, pos, batch, int(pos.max()) + 1, logits_at=torch.zeros(len(batch), dtype=torch.long))
            if native:
                worst["plan"].append(isinstance(model._decode_plan, DecodePlan))
            results.append((logits, [(k.clone(), v.clone()) for k, v in caches]))
        (a, ca), (b, cb) = results
        worst["logits"] = max(worst["logits"], (a - b).abs().max().item())
        worst["scale"] = max(worst["scale"], b.abs().max().item())
        worst["cache"] = max(worst["cache"], max(max((x - y).abs().max().item() for x, y in zip(p, q)) for p, q in zip(ca, cb)))
    # a prompt chunk of 40 tokens into cache row 4 (products of 40 rows: sgemm where torch lends it)
    chunk = torch.randint(3, vocab, (1, 40), generator=g)
    saved = [(k.clone(), v.clone()) for k, v in caches]
    results = []
    for native in (True, False):
        for (k, v), (k0, v0) in zip(caches, saved):
            k.copy_(k0), v.copy_(v0)
        model._decode_plan = None if native else False
        logits = model(chunk, torch.arange(40)[None], [4], 40, logits_at=torch.tensor([39]))
        if native:
            worst["plan"].append(isinstance(model._decode_plan, DecodePlan))
        results.append((logits, [(k.clone(), v.clone()) for k, v in caches]))
    (a, ca), (b, cb) = results
    worst["chunk_logits"] = (a - b).abs().max().item()
    worst["chunk_cache"] = max(max((x - y).abs().max().item() for x, y in zip(p, q)) for p, q in zip(ca, cb))
    worst["blas"] = BLAS
    # a weight moved to new memory (here: zeroed in a copy) after the plan was built, and the plan
    # invalidated as whoever changes a weight must: the next C step reads the new weight
    model._decode_plan = None
    model(torch.tensor([[5]]), torch.tensor([[39]]), [1], 40, logits_at=torch.zeros(1, dtype=torch.long))
    assert isinstance(model._decode_plan, DecodePlan)
    wo = model.layers[-1].attention.wo
    wo.weight.data = torch.zeros_like(wo.weight)
    model.invalidate_decode_plan()
    pos, tokens = torch.tensor([[40]]), torch.tensor([[7]])
    got = []
    for native in (True, False):
        saved = [(k.clone(), v.clone()) for k, v in caches]
        model._decode_plan = None if native else False
        got.append(model(tokens, pos, [1], 41, logits_at=torch.zeros(1, dtype=torch.long)))
        for (k, v), (k0, v0) in zip(caches, saved):
            k.copy_(k0), v.copy_(v0)
    worst["after_move"] = (got[0] - got[1]).abs().max().item()
    worst["rebuilt"] = isinstance(model._decode_plan, DecodePlan) or model._decode_plan is False
    model._decode_plan = None
    try:  # a position past the cache: refused before C would write there
        model(torch.tensor([[5]]), torch.tensor([[64]]), [1], 65, logits_at=torch.zeros(1, dtype=torch.long))
        worst["past_the_cache"] = "ran"
    except IndexError:
        worst["past_the_cache"] = "IndexError"
    report[tag] = worst
(out / f"native.{info.rank}.json").write_text(json.dumps(report))
shutdown_distributed()
