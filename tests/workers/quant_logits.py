"""Run under torchrun by tests/test_quant.py: for each `tag=folder[:quantize]` argument, load the
model (quantized on the fly when asked) and write every rank's logits for a fixed prompt and its
linear layers' weight bytes."""
import json
import sys
from pathlib import Path

import torch

from llama_demo.model.parallel import init_distributed, shutdown_distributed
from specs import models
from llama_demo.model.quant import weight_bytes

PROMPT = [1, 17, 250, 33, 8, 120, 64, 5, 99, 300]
out = Path(sys.argv[1])
info = init_distributed()
report = {}
for tag, model in models(sys.argv[2:], info, max_seq_len=32, max_batch_size=1):
    ids = torch.tensor([PROMPT])
    logits = model(ids, torch.arange(len(PROMPT))[None], slice(0, 1), len(PROMPT))[0]
    torch.save(logits.clone(), out / f"{tag}.{info.rank}.pt")
    report[tag] = weight_bytes(model)
(out / f"bytes.{info.rank}.json").write_text(json.dumps(report))
shutdown_distributed()
