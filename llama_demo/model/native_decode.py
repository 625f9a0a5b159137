"""A decode step (one new token per sequence) of a CPU float32 model through the C kernels.

In a small model's decode step the ~40 torch ops per layer around the matrix products (norms,
rotary, cache writes, attention, SiLU, residual adds), a few microseconds of dispatch each, cost
as much as the products, and every return to Python between products lets the OpenMP threads fall
asleep. Here a layer is two C calls (qkernels.c's qk_decode_attention and qk_decode_ffn), split
where model-parallel ranks all-reduce, and on a single rank the whole step is one call
(qk_decode_layers: Python's ~0.9 ms a step between calls gone); the arithmetic is the torch
path's (Transformer.step), which every other step takes and the tests compare this with. Measured
on SmolLM2-135M, batch 1, 2 AMD EPYC cores, `model.step` alone: float32 35 -> 24 -> 22.7 ms a
token, int8 14.6 -> 8-11 -> 7.3-8, int4 10.4 -> 7-9 -> 6.7 (README's "Measured" section has the
benchmark beside llama.cpp).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from fairscale.nn.model_parallel.initialize import get_model_parallel_group

from . import cpu_kernels
from .cpu_kernels import LayerSpec, ProductSpec, StepSpec
from .parallel import all_reduce_sum
from .parts import Part


@dataclass
class _Layer:
    qkv: ProductSpec
    wo: ProductSpec
    w13: ProductSpec
    w2: ProductSpec
    attention_norm: torch.Tensor
    ffn_norm: torch.Tensor
    cache_k: torch.Tensor
    cache_v: torch.Tensor

    def spec(self) -> LayerSpec:
        products = (ctypes.pointer(s) for s in (self.qkv, self.wo, self.w13, self.w2))
        return LayerSpec(*products, *(t.data_ptr() for t in (self.attention_norm, self.ffn_norm, self.cache_k, self.cache_v)))


class DecodePlan:
    """The model's products as the C kernels take them, built once per model (`for_model`)."""

    def __init__(self, model, layers: list[_Layer]):
        self.layers = layers
        self.specs = (LayerSpec * len(layers))(*(layer.spec() for layer in layers))
        self.layer_at = [ctypes.addressof(spec) for spec in self.specs]
        att = model.layers[0].attention
        self.heads, self.kv_heads, self.head_dim = att.n_local_heads, att.n_local_kv_heads, att.head_dim
        self.blocks, self.block_size = model.kv_blocks, model.block_size
        self.max_seq = model.args.max_seq_len
        self.eps = model.layers[0].attention_norm.eps
        # the tensors the plan holds addresses of, kept alive here: a weight replaced by a new tensor
        # (which must call model.invalidate_decode_plan) leaves the old memory valid, not freed
        self.tensors = [t for layer in layers for spec in (layer.qkv, layer.wo, layer.w13, layer.w2) for t in spec.tensors]
        self.tensors += [t for layer in layers for t in (layer.attention_norm, layer.ffn_norm, layer.cache_k, layer.cache_v)]
        # Steps of more rows than this take the torch ops: float32 weights only (quantized ones have
        # no faster torch product here), as a probe at build time finds (float_rows_limit)
        self.max_rows = None
        if any(layer.w13.kind == 0 for layer in layers):
            cpu_kernels.lend_blas()  # before the probe: many-row products in torch's GEMM, the rest in C
            self.max_rows = float_rows_limit(model, self)

    def takes(self, rows: int) -> bool:
        return self.max_rows is None or rows <= self.max_rows

    @classmethod
    def for_model(cls, model) -> "DecodePlan | None":
        """A plan for `model`, or None when some product cannot run in C (a quantized layer on a
        torch kernel, an unfused layer, weights not float32 on CPU) or the kernels are not built."""
        if cpu_kernels.native() is None or model.rope is None or model.norm.weight.dtype != torch.float32:
            return None
        layers = []
        for block in model.layers:
            att, ffn = block.attention, block.feed_forward
            if att.qkv is None or ffn.w13 is None or att.cache_k is None or att.cache_k.dtype != torch.float32:
                return None
            specs = [att.qkv.native_spec(), att.wo.native_spec(), ffn.w13.native_spec(), ffn.w2.native_spec()]
            if any(s is None for s in specs):
                return None
            layers.append(_Layer(*specs, block.attention_norm.weight, block.ffn_norm.weight, att.cache_k, att.cache_v))
        return cls(model, layers)



def plan_for(model) -> DecodePlan | None:
    """The model's plan: built at its first CPU step after load (or after
    model.invalidate_decode_plan, which setup_cache and fusing call), never re-examined per step,
    so every rank builds it (and votes in its probe) at the same step; None for a model whose
    steps cannot run in C (remembered as False)."""
    plan = model._decode_plan
    if plan is None:
        plan = model._decode_plan = DecodePlan.for_model(model) or False
    return plan or None


PROBE_ROWS = 16  # a batched decode step's rows, for the probe below
PROBE_CHUNKS = (32, 64, 96, 128)  # prompt chunks' tokens, for the probe below


def float_rows_limit(model, plan: DecodePlan) -> int | None:
    """The most tokens a float32 step should run in C. Probes, C against the torch ops (whose
    products are oneDNN's or MKL's GEMM): a decode step of PROBE_ROWS rows, then steps carrying a
    prompt chunk of each of PROBE_CHUNKS tokens, in turn until C loses one. 4, the C product's tile
    (at which it streams the weights once and wins anyway), when C loses the decode step; else the
    largest chunk C won (at least PROBE_ROWS), or None (no limit) when it won them all. On the
    2-core AVX2 VM C won up to 96 tokens (10-20% faster from 17 to 96: chat turns, prompts of a
    few sentences, verifications of several sequences) and lost at 128 (276 vs 262 ms), where a
    GEMM's blocking pays. A probe, not a rule, because the answer depends on the CPU: oneDNN uses
    AVX-512 and AMX where a CPU has them, the C kernel does not. Runs once per model, at its
    first CPU step (~2-3 s for SmolLM2-135M here), on every rank together (both paths make the
    same collectives, and the ranks agree on each outcome before the next probe). The probes
    write the cache's first blocks, restored after."""
    import time

    rows = min(PROBE_ROWS, model.args.max_batch_size)
    if rows <= 4:
        return None
    at = min(63, model.args.max_seq_len - 1)
    chunks = [n for n in PROBE_CHUNKS if n <= model.args.max_seq_len]
    bs = model.block_size
    table = torch.arange(-(-max([at + 1] + chunks) // bs))[None]  # every probe row reads and writes these blocks
    caches = [(b.attention.cache_k, b.attention.cache_v) for b in model.layers]
    saved = [(k[:table.shape[1]].clone(), v[:table.shape[1]].clone()) for k, v in caches]
    probes = [(torch.full((rows,), at, dtype=torch.long), [Part.of(0, table.expand(rows, -1), torch.full((rows, 1), at), bs)])]
    probes += [(torch.arange(n), [Part.of(0, table, torch.arange(n)[None], bs)]) for n in chunks]
    group = get_model_parallel_group()
    everyone = torch.distributed.get_world_size(group)
    won = []  # the probes C won, on every rank, in order until the first it lost
    with torch.inference_mode():
        for pos, parts in probes:
            h = model.tok_embeddings(torch.ones(1, len(pos), dtype=torch.long))
            last = torch.tensor([len(pos) - 1])
            times = {"c": [], "torch": []}
            for _ in range(2):
                for path in times:
                    t0 = time.perf_counter()
                    if path == "c":
                        decode_step(model, plan, h[0], pos, parts, last)
                    else:
                        model.torch_step(h, pos, parts, last)
                    times[path].append(time.perf_counter() - t0)
            win = torch.tensor([1.0 if min(times["c"]) <= min(times["torch"]) else 0.0])
            if all_reduce_sum(win, group).item() != everyone:
                break
            won.append(len(pos))
        for (k, v), (k0, v0) in zip(caches, saved):
            k[:len(k0)], v[:len(v0)] = k0, v0
    if not won:
        return 4
    return None if len(won) == len(probes) else max(PROBE_ROWS, won[-1])


def decode_step(model, plan: DecodePlan, h: torch.Tensor, pos: torch.Tensor, parts, logits_at,
                every_rank: bool = True) -> torch.Tensor:
    """Transformer.step through the C layers: decode rows and prompt chunks alike. h (N, dim): the
    tokens' embeddings. Returns float32 logits at logits_at (or every token when None), on rank 0
    only unless every_rank (Transformer.logits)."""
    lib, group = cpu_kernels.native(), get_model_parallel_group()
    N, dim = h.shape
    width = max(p.tables.shape[1] for p in parts)
    tables = torch.zeros(N, width, dtype=torch.long)  # each token's sequence's block table
    for p in parts:  # a prompt chunk is T tokens of one sequence: the C attention writes every
        # token's k, v before any token attends, each over its positions 0..pos: causal, as the mask
        tables[p.tokens, :p.tables.shape[1]] = p.tables.repeat_interleave(p.pos.shape[1], 0)
    pos = pos.to(torch.long).contiguous()
    # C indexes the cache with these unchecked: a bad one is an error here, not a stray write
    # (CPU tensors: read through numpy, host memory, no device to wait for)
    p_, t_ = pos.numpy(), tables.numpy()
    if (p_.min() < 0 or p_.max() >= min(plan.max_seq, width * plan.block_size)
            or t_.min() < 0 or t_.max() >= plan.blocks):
        raise IndexError(f"decode step outside the KV cache ({plan.blocks} blocks of {plan.block_size} positions, "
                         f"{plan.max_seq} positions a sequence)")
    rope = torch.view_as_real(model.rope)  # (max_seq, head_dim/2, 2): cos, sin
    step = ctypes.byref(StepSpec(N, dim, plan.heads, plan.kv_heads, plan.head_dim, plan.block_size, width,
                                 tables.data_ptr(), pos.data_ptr(), rope.data_ptr(), plan.eps))
    h = h.contiguous().clone()  # the residual stream, added to in place
    delta = torch.empty(N, dim)  # the last layer's (all-reduced) FFN output, added to h by the next call
    if torch.distributed.get_world_size(group) == 1:  # nothing to all-reduce: every layer in one call
        if lib.qk_decode_layers(h.data_ptr(), plan.specs, len(plan.layers), step, delta.data_ptr()):
            raise MemoryError("no memory for the decode step's scratch")
    else:
        for i, layer_at in enumerate(plan.layer_at):
            out = torch.empty(N, dim)
            if lib.qk_decode_attention(h.data_ptr(), delta.data_ptr() if i else None, layer_at, step, out.data_ptr()):
                raise MemoryError("no memory for the decode step's scratch")
            out = all_reduce_sum(out, group)
            if lib.qk_decode_ffn(h.data_ptr(), out.data_ptr(), layer_at, step, delta.data_ptr()):
                raise MemoryError("no memory for the decode step's scratch")
            delta = all_reduce_sum(delta, group)
    if logits_at is not None and logits_at.numel() == 0:  # no token wants logits: no output layer (on every rank alike)
        return h.new_zeros(0, model.args.vocab_size)
    x = cpu_kernels.native_rmsnorm(delta, model.norm.weight, model.norm.eps, residual=h)
    if logits_at is not None:
        x = x[logits_at]
    return model.logits(x, every_rank)
