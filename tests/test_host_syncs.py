"""A decode step reads the device into Python once: the sampled ids (rank 0). Host syncs stall a
GPU's stream, so the sampling branches come from host-side flags (SamplingBatch), the attention
parts' lengths from the sequences' host positions, and rank 0 never reads back the broadcast it
sent. Counted by patching Tensor.item, tolist, __bool__, __int__ (and __float__, __index__)
around one decode step of six requests with mixed sampling params (tests/workers/host_syncs.py)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, subprocess_env


def test_a_decode_step_reads_the_device_once(ckpts):
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" / "host_syncs.py"), str(ckpts["mha-1"])],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["syncs"] <= 1, "\n".join(got["where"])
