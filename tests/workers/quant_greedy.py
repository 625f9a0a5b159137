"""Run under torchrun by tests/test_quant.py: for each `tag=folder[:quantize]` argument, load the
model (quantized on the fly when asked) and write rank 0's greedy choice at each decode step (one
token per step through the KV cache, as the engine decodes) after a fixed prompt, each choice's
lead over the runner-up, and which product each layer runs."""
import json
import sys
from collections import Counter
from pathlib import Path

import torch

from llama_demo.model.parallel import init_distributed, shutdown_distributed
from specs import models

PROMPT = [1, 17, 250, 33, 8, 120, 64, 5, 99, 300]
# Fed one per step after the prompt whatever each model picks, so that one near-tie does not send
# the models down different texts: every step's greedy choice is compared on the same prefix.
FORCED = [186, 294, 161, 338, 84, 354, 166, 138, 23, 71, 6, 317, 282, 364, 12, 40, 77, 391, 150, 9, 205, 133, 58, 270,
          311, 44, 199, 3, 260, 118, 347, 95]
out = Path(sys.argv[1])
info = init_distributed()
report = {}
for tag, model in models(sys.argv[2:], info, max_seq_len=64, max_batch_size=1):
    ids = torch.tensor([PROMPT])
    logits = model(ids, torch.arange(len(PROMPT))[None], slice(0, 1), len(PROMPT), logits_at=torch.tensor([len(PROMPT) - 1]))
    tokens, margins = [], []
    for i, nxt in enumerate(FORCED):
        tokens.append(int(logits[0].argmax()))
        top2 = logits[0].topk(2).values
        margins.append(float((top2[0] - top2[1]) / logits[0].std()))  # the lead of the choice, in logit stds
        pos = len(PROMPT) + i
        logits = model(torch.tensor([[nxt]]), torch.tensor([[pos]]), slice(0, 1), pos + 1, logits_at=torch.tensor([0]))
    kernels = Counter(getattr(m, "kernel", None) for m in model.modules() if hasattr(m, "kernel"))
    report[tag] = {"tokens": tokens, "margins": margins, "kernels": dict(kernels)}
(out / f"greedy.{info.rank}.json").write_text(json.dumps(report))
shutdown_distributed()
