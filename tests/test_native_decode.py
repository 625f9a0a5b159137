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
    for batch in (1, 2, 3, 4, 5, 6, 7):  # tiles of 2, 3 and 4 activation rows per pass over the weights
        x = torch.randn(batch, cols, generator=g)
        got = cpu_kernels.native_f32_linear(x, w).double()
        ref = x.double() @ w.double().T
        # float32 products summed in float32, in another order: a few ulps of sum |w x|
        bound = 1e-6 * cols ** 0.5 * (x.double().abs() @ w.double().abs().T) + 1e-30
        assert torch.all((got - ref).abs() <= bound), (rows, cols, batch)
    with torch.inference_mode():  # the single-row dispatch (matmul_t) takes it
        assert torch.equal(cpu_kernels.matmul_t(x[:1], w), cpu_kernels.native_f32_linear(x[:1], w))
    # a row's products do not depend on how many rows share its pass (1 to 4): a batched or
    # verified step gives a sequence what it gets alone
    x = torch.randn(4, cols, generator=g)
    firsts = [cpu_kernels.native_f32_linear(x[:b], w)[0] for b in (1, 2, 3, 4)]
    assert all(torch.equal(firsts[0], f) for f in firsts[1:]), (rows, cols)
    with torch.inference_mode():  # and matmul_t sends a few rows to the same product
        assert torch.equal(cpu_kernels.matmul_t(x[:3], w), cpu_kernels.native_f32_linear(x[:3], w))
    assert cpu_kernels.c_rows_limit() >= 4


@NATIVE
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 2, 64), (4, 4, 24), (8, 1, 128), (2, 1, 12)])
def test_c_attention_matches_float64_softmax(heads, kv_heads, head_dim):
    # qkernels.c's qk_attend_decode over the paged pool: a sequence's positions in runs of up to 64
    # within its blocks (here 16 positions, anywhere in the pool, in table order), with an online
    # softmax, split into spans merged at the end when there are few (token, KV head) pairs;
    # head_dim 64 / 128: the 8-row score and 64-float output registers; 24: 8-row scores, scalar
    # output; 12: scalar
    g = torch.Generator().manual_seed(heads * head_dim)
    bs, max_seq, pos = 16, 400, [0, 130, 399]  # one position, 8 blocks + 3, a full table
    per = max_seq // bs
    blocks = 3 * per + 5
    order = torch.randperm(blocks, generator=g)  # each sequence's blocks scattered over the pool
    tables = torch.stack([order[i * per:(i + 1) * per] for i in range(3)])
    B = len(pos)
    cache_k = torch.randn(blocks, kv_heads, bs, head_dim, generator=g)
    cache_v = torch.randn(blocks, kv_heads, bs, head_dim, generator=g)
    qkv = torch.randn(B, (heads + 2 * kv_heads) * head_dim, generator=g) * 2
    angles = torch.rand(max_seq, head_dim // 2, generator=g) * 6
    rope = torch.view_as_real(torch.polar(torch.ones_like(angles), angles)).contiguous()
    ref_k, ref_v, ref_qkv = cache_k.clone(), cache_v.clone(), qkv.clone()
    out = torch.empty(B, heads * head_dim)
    lib = cpu_kernels.native()
    pos_t, before = torch.tensor(pos), torch.get_num_threads()

    def positions(cache, b, n):  # (kv_heads, n, head_dim): sequence b's first n positions, in order
        return cache[tables[b]].transpose(0, 1).reshape(kv_heads, per * bs, head_dim)[:, :n]

    for threads in (1, 2):  # one thread: spans of the whole length; two: split spans
        torch.set_num_threads(threads)
        k, v, x = ref_k.clone(), ref_v.clone(), ref_qkv.clone()
        assert lib.qk_attend_decode(x.data_ptr(), B, heads, kv_heads, head_dim, tables.data_ptr(), per,
                                    pos_t.data_ptr(), rope.data_ptr(), k.data_ptr(), v.data_ptr(), bs,
                                    out.data_ptr()) == 0
        for b, p in enumerate(pos):
            turn = torch.polar(torch.ones(head_dim // 2, dtype=torch.float64), angles[p].double())
            def rotate(t):  # Meta's apply_rotary_emb: interleaved pairs as complex numbers
                return torch.view_as_real(torch.view_as_complex(t.double().reshape(-1, head_dim // 2, 2)) * turn).reshape(-1, head_dim)
            q = rotate(ref_qkv[b, :heads * head_dim])
            new_k = rotate(ref_qkv[b, heads * head_dim:(heads + kv_heads) * head_dim])
            new_v = ref_qkv[b, (heads + kv_heads) * head_dim:].double().view(kv_heads, head_dim)
            at = tables[b, p // bs], p % bs
            assert torch.allclose(k[at[0], :, at[1]].double(), new_k, atol=1e-5)
            assert torch.equal(v[at[0], :, at[1]].double(), new_v)
            keys, values = positions(k, b, p + 1).double(), positions(v, b, p + 1).double()
            group = heads // kv_heads
            scores = torch.einsum("hd,htd->ht", q, keys.repeat_interleave(group, 0)) / head_dim ** 0.5
            want = torch.einsum("ht,htd->hd", scores.softmax(-1), values.repeat_interleave(group, 0))
            # float32 scores of order 10 in another summation order and a polynomial exp: ~1e-5
            assert torch.allclose(out[b].double().view(heads, head_dim), want, atol=2e-5, rtol=1e-4), (threads, b)
        unused = order[3 * per:]  # blocks no table holds: untouched
        assert torch.equal(k[unused], ref_k[unused]) and torch.equal(v[unused], ref_v[unused])
    torch.set_num_threads(before)


@NATIVE
def test_portable_build_agrees_with_this_cpus_build(tmp_path):
    """qkernels.c without -march=native (the loops a CPU without AVX2 runs, e.g. an ARM server)
    gives this CPU's build's products and attention, up to float32 summation order: the activations
    are rounded to int8 identically in both, so only the order of the float sums differs."""
    from llama_demo.model.quant import quantize_int4_rtn, quantize_int8

    assert cpu_kernels.build(cpu_kernels.compiler(), tmp_path / "portable.so", march=False)
    builds = [cpu_kernels.native(), cpu_kernels.load_library(tmp_path / "portable.so")]
    g = torch.Generator().manual_seed(7)

    def agree(run, shape):  # run(lib, out) on each build, then compare
        outs = [torch.zeros(shape) for _ in builds]
        for lib, out in zip(builds, outs):
            assert run(lib, out) in (0, None)
        assert torch.allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5 * outs[0].abs().max().item()), run
        assert outs[0].abs().max() > 0

    w = torch.randn(37, 200, generator=g)
    q8, s8 = quantize_int8(torch.randn(37, 288, generator=g))
    q4 = {group: quantize_int4_rtn(torch.randn(24, 384, generator=g), group) for group in (32, 64)}
    for B in (1, 5):
        x = torch.randn(B, 384, generator=g)
        xf, x8 = x[:, :200].contiguous(), x[:, :288].contiguous()
        agree(lambda lib, y: lib.qk_linear_f32(xf.data_ptr(), B, w.data_ptr(), 37, 200, y.data_ptr()), (B, 37))
        agree(lambda lib, y: lib.qk_linear_q8(x8.data_ptr(), B, q8.data_ptr(), s8.data_ptr(), 37, 288, y.data_ptr()), (B, 37))
        for group, (packed, scales, zeros) in q4.items():
            agree(lambda lib, y: lib.qk_linear_q4(x.data_ptr(), B, packed.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
                                                  24, 384, group, y.data_ptr()), (B, 24))
    heads, kv_heads, hd, max_seq, pos = 6, 2, 64, 300, torch.tensor([5, 299])
    tables = torch.tensor([list(range(19, 38)), list(range(19))])  # 2 x 19 blocks of 16 positions
    cache = [torch.randn(38, kv_heads, 16, hd, generator=g) for _ in range(2)]
    qkv = torch.randn(2, (heads + 2 * kv_heads) * hd, generator=g)
    angles = torch.rand(max_seq, hd // 2, generator=g)
    rope = torch.view_as_real(torch.polar(torch.ones_like(angles), angles)).contiguous()

    def attend(lib, out):
        k, v, x = cache[0].clone(), cache[1].clone(), qkv.clone()
        return lib.qk_attend_decode(x.data_ptr(), 2, heads, kv_heads, hd, tables.data_ptr(), 19, pos.data_ptr(),
                                    rope.data_ptr(), k.data_ptr(), v.data_ptr(), 16, out.data_ptr())
    agree(attend, (2, heads * hd))


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
            assert r["plan"] == [True] * 7, (tag, r)
            # the same float32 arithmetic in another order (fused residual adds, a polynomial exp):
            # a few ulps of values of order `scale`; quantized products round their activations to
            # int8 on both paths, where an ulp's difference can flip one rounding (seen: 1.8e-3 of
            # the scale, int4, 2 ranks, once the attention summed its positions in 16-position blocks)
            tolerance = 2e-5 if "int" not in tag else 4e-3
            assert r["logits"] <= tolerance * max(r["scale"], 1.0), (tag, r)
            assert r["cache"] <= 1e-5, (tag, r)
            assert r["after_move"] <= tolerance * max(r["scale"], 1.0), (tag, r)  # a weight replaced: seen
            # a 40-token prompt chunk in C (float32: its products in torch's sgemm where torch has MKL)
            assert r["chunk_logits"] <= tolerance * max(r["scale"], 1.0) and r["chunk_cache"] <= 1e-5, (tag, r)
            assert r["blas"] == (cpu_kernels.torch_sgemm() is not None), (tag, r)
            assert r["past_the_cache"] == "IndexError", (tag, r)
            # float32 plans probe C against torch ops at 6 decode rows, then chunks of 32 and 64 tokens
            # until C loses (either may win here: no limit, the largest chunk C won, at least 16, or
            # the C tile); the ranks agree
            assert r["probe_kept_cache"] and r["max_rows"] in ((None, 4, 16, 32) if "int" not in tag else (None,)), (tag, r)
        if rank:
            first = json.loads((tmp_path / "native.0.json").read_text())
            assert [r["max_rows"] for r in got.values()] == [r["max_rows"] for r in first.values()]


@NATIVE
def test_paged_attention_equals_the_gathered_torch_attention():
    """The torch path's decode rows on CPU attend in C over their block tables in place
    (cpu_kernels.paged_attention): the same as gathering their blocks and attending in torch ops."""
    from llama_demo.model.parts import Part, padded_tables

    g = torch.Generator().manual_seed(3)
    heads, kv_heads, hd, bs = 6, 2, 32, 4
    cache_k, cache_v = (torch.randn(40, kv_heads, bs, hd, generator=g) for _ in range(2))
    tables = padded_tables([[5, 9, 1], [30, 2, 7, 8, 11, 12], [0]])  # ragged, padded with block 0
    pos = torch.tensor([[10], [21], [2]])
    q = torch.randn(3, heads, hd, generator=g)
    got = cpu_kernels.paged_attention(q, tables, pos, cache_k, cache_v)
    p = Part.of(0, tables, pos, bs)
    want = cpu_kernels.attention(q[:, :, None], p.gather(cache_k), p.gather(cache_v), p.mask)
    assert torch.allclose(got, want.reshape(3, heads * hd), atol=1e-5)
