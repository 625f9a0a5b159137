"""The C decode step (model/native_decode.py, model/qkernels.c) against the torch ops every other
step takes, and the C float32 product against float64, on CPU."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import NATIVE, make_checkpoint, torchrun
from llama_demo.model import cpu_kernels


@NATIVE
@pytest.mark.parametrize("rows,cols", [(7, 5), (37, 96), (64, 576), (130, 200), (3, 1536)])
def test_native_float32_product_matches_float64(rows, cols):
    # rows: runs of 16 per thread with a remainder; cols: the 32-wide loop, its 8-wide and scalar tails
    g = torch.Generator().manual_seed(rows * cols)
    w = torch.randn(rows, cols, generator=g)
    for batch in (1, 2, 5):  # up to 4 activation rows per pass over the weights, then the rest
        x = torch.randn(batch, cols, generator=g)
        got = cpu_kernels.native_f32_linear(x, w).double()
        ref = x.double() @ w.double().T
        # float32 products summed in float32, in another order: a few ulps of sum |w x|
        bound = 1e-6 * cols ** 0.5 * (x.double().abs() @ w.double().abs().T) + 1e-30
        assert torch.all((got - ref).abs() <= bound), (rows, cols, batch)
    with torch.inference_mode():  # the single-row dispatch (matmul_t) takes it
        assert torch.equal(cpu_kernels.matmul_t(x[:1], w), cpu_kernels.native_f32_linear(x[:1], w))


@NATIVE
@pytest.mark.parametrize("world", [1, 2])
def test_c_decode_step_equals_the_torch_ops(tmp_path, world):
    """float32, int8 and int4 models, multi-head, grouped-query and single-KV-head shapes, on 1 and 2 ranks:
    decode steps of three sequences at different positions (two runs of cache rows) and of one
    give the logits and KV cache of the torch path to float32 rounding, and really ran in C; a
    weight replaced after the first C step is what the next one reads."""
    gqa = make_checkpoint(tmp_path / "gqa", "gqa", seed=4)
    mha = make_checkpoint(tmp_path / "mha", "mha", seed=6)
    mqa = make_checkpoint(tmp_path / "mqa", "mqa", seed=5)
    # (quantized: shapes whose every per-rank product is whole blocks of 32, as the C kernels need)
    specs = [f"gqa={gqa}", f"mqa={mqa}", f"mha-int8={mha}:int8", f"mqa-int4={mqa}:int4"]
    torchrun(world, ["tests/workers/native_decode.py", str(tmp_path), *specs])
    for rank in range(world):
        got = json.loads((tmp_path / f"native.{rank}.json").read_text())
        assert set(got) == {"gqa", "mqa", "mha-int8", "mqa-int4"}
        for tag, r in got.items():
            assert r["plan"] == [True] * 6, (tag, r)
            # the same float32 arithmetic in another order (fused residual adds, a polynomial exp):
            # a few ulps of values of order `scale`
            assert r["logits"] <= 2e-5 * max(r["scale"], 1.0), (tag, r)
            assert r["cache"] <= 1e-5, (tag, r)
            assert r["after_move"] <= 2e-5 * max(r["scale"], 1.0), (tag, r)  # a weight replaced: seen
            assert r["past_the_cache"] == "IndexError", (tag, r)
            # float32 plans probe C against torch ops at 6 rows (either may win here); the ranks agree
            assert r["probe_kept_cache"] and r["max_rows"] in ((None, 4) if "int" not in tag else (None,)), (tag, r)
        if rank:
            first = json.loads((tmp_path / "native.0.json").read_text())
            assert [r["max_rows"] for r in got.values()] == [r["max_rows"] for r in first.values()]
