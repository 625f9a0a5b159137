"""The LLaMA transformer (LLaMA 1, Llama 2, Llama 3) on fairscale's model-parallel layers.

Each rank holds 1/N of every split weight: column-parallel layers split output rows (wq, wk, wv,
w1, w3, output), row-parallel layers split input columns and all-reduce (wo, w2), and the
embedding splits its feature dimension. References: Meta's llama/model.py, gpt-fast's model.py.

The KV cache is paged: one pool of blocks of `block_size` positions per layer, and per sequence
a block table (engine.scheduler hands blocks out), so sequences of different lengths decode
together, each at its own position, holding only the blocks their tokens fill, and sequences
with the same prefix share its blocks. That is what continuous batching stands on.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import get_model_parallel_group, get_model_parallel_world_size
import fairscale.nn.model_parallel.layers as fairscale_layers
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from torch import nn

from ..config import KV_BLOCK_SIZE, ModelArgs
from ..config import rope_frequencies as config_rope_frequencies
from . import cpu_kernels, native_decode
from .cpu_kernels import matmul_t
from .parallel import all_gather_last, all_reduce_sum, gather_last_to_first
from .parts import Part


def _keep(x: torch.Tensor) -> torch.Tensor:
    """init_method for fairscale layers: weights come from the checkpoint, skip random init."""
    return x


@contextlib.contextmanager
def skip_fairscale_init():
    """fairscale builds (and copies from) a full-size master weight per layer on every rank when
    there are several; weights come from the checkpoint, so skip that work and memory."""
    saved = fairscale_layers._initialize_affine_weight
    fairscale_layers._initialize_affine_weight = lambda *a, **k: None
    try:
        yield
    finally:
        fairscale_layers._initialize_affine_weight = saved


class FusedColumns:
    """Column-parallel layers that read the same input (wq wk wv; w1 w3) as one matrix product.
    Their weights become row blocks (views) of one matrix, so memory is unchanged, and a
    single-row step makes one OpenBLAS call instead of three (measured on SmolLM2-135M's shapes:
    20% less matrix time per token). Not a module: state dicts keep Meta's names, and `.to()`
    does not move it, so fuse after the model is on its device (load_model does)."""

    def __init__(self, layers: list[nn.Module]):
        self.sizes = [m.weight.shape[0] for m in layers]
        self.weight = torch.cat([m.weight.detach() for m in layers])
        for m, part in zip(layers, self.weight.split(self.sizes)):
            m.weight.data = part  # the layers keep working (and loading) on their own rows
            m.packed = None
        self.packed: torch.Tensor | None = None

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """The layers' outputs side by side, unsplit."""
        return matmul_t(x, self.weight, self.packed)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.whole(x).split(self.sizes, dim=-1)

    def native_spec(self) -> cpu_kernels.ProductSpec | None:
        return cpu_kernels.ProductSpec.float32(self.weight)


def fuse_linears(model: nn.Module) -> None:
    """Fuse each block's wq/wk/wv and w1/w3 (float layers only; quantized ones keep their own)."""
    for block in model.layers:
        att, ffn = block.attention, block.feed_forward
        if all(type(m) is ColumnLinear for m in (att.wq, att.wk, att.wv)):
            att.qkv = FusedColumns([att.wq, att.wk, att.wv])
        if all(type(m) is ColumnLinear for m in (ffn.w1, ffn.w3)):
            ffn.w13 = FusedColumns([ffn.w1, ffn.w3])
    model.invalidate_decode_plan()


class ColumnLinear(ColumnParallelLinear):
    """ColumnParallelLinear (no bias, output left split across ranks unless gather_output)."""

    packed: torch.Tensor | None = None  # oneDNN's blocked copy of weight (pack_for_cpu)

    def __init__(self, in_features: int, out_features: int, gather_output: bool = False):
        super().__init__(in_features, out_features, bias=False, gather_output=gather_output, init_method=_keep)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's matrix product; quantized layers (quant.py) override only this and native_spec."""
        return matmul_t(x, self.weight, self.packed)

    def native_spec(self) -> cpu_kernels.ProductSpec | None:
        """This product for the C decode step (native_decode.py), or None when it cannot run there."""
        return cpu_kernels.ProductSpec.float32(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # copy_to_model_parallel_region is the identity in the forward pass: skip it
        y = self._mm(x)
        return all_gather_last(y, get_model_parallel_group()) if self.gather_output else y


class RowLinear(RowParallelLinear):
    """RowParallelLinear (no bias): input arrives split across ranks, output is all-reduced."""

    packed: torch.Tensor | None = None

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False, input_is_parallel=True, init_method=_keep)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return matmul_t(x, self.weight, self.packed)

    native_spec = ColumnLinear.native_spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(self._mm(x), get_model_parallel_group())


class Embedding(ParallelEmbedding):
    """ParallelEmbedding: each rank holds a slice of the feature dimension; rows are gathered."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim, init_method=_keep)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return all_gather_last(F.embedding(tokens, self.weight), get_model_parallel_group())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op, same arithmetic
        # normalise in float32 whatever the weights' dtype, as Meta's code does
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse frequencies of Meta's rotary embedding, with Llama 3's scaling (and its factor) as
    params.json asks: config.rope_frequencies is their one home."""
    freqs = config_rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
    return torch.tensor(freqs, dtype=torch.float64, device=device).float()


def rope_table(args: ModelArgs, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(length, head_dim/2) complex64: e^(i * position * frequency), Meta's freqs_cis."""
    freqs = rope_frequencies(args, device)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0,x1),(x2,x3),... by complex multiplication, as Meta's code does.
    x: (B, T, heads, head_dim); rope: (B, T, head_dim/2) complex."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, h, hd/2)
    return torch.view_as_real(xc * rope[:, :, None, :]).flatten(-2).type_as(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q: (B, heads, T, hd); k, v: (B, kv heads, S, hd); mask: (B, 1, T, S) bool or None.
    SDPA's fused kernels, except on CPU (cpu_kernels.attention says why)."""
    if q.device.type == "cpu":
        return cpu_kernels.attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        world = get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // world
        # With more ranks than KV heads, each rank keeps one replicated KV head (checkpoint.py
        # copies the right one): the layer is built as if there were `world` KV heads.
        self.n_kv_total = max(args.n_kv_heads, world)
        self.n_local_kv_heads = self.n_kv_total // world
        self.head_dim = args.head_dim
        self.wq = ColumnLinear(args.dim, args.n_heads * self.head_dim)
        self.wk = ColumnLinear(args.dim, self.n_kv_total * self.head_dim)
        self.wv = ColumnLinear(args.dim, self.n_kv_total * self.head_dim)
        self.wo = RowLinear(args.n_heads * self.head_dim, args.dim)
        self.qkv: FusedColumns | None = None  # fuse_linears
        # (blocks, local kv heads, block_size, head_dim): heads before positions, so that a block's
        # keys for one head are one contiguous run (the C attention reads them in place)
        self.cache_k: torch.Tensor | None = None
        self.cache_v: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, parts: list["Part"]) -> torch.Tensor:
        """x: (1, N, dim), the step's tokens side by side, so each weight is read once per step;
        rope: (1, N, head_dim/2); each part's tokens write their keys and values into their
        sequences' cache blocks and attend to them."""
        _, N, _ = x.shape
        h, kvh, hd = self.n_local_heads, self.n_local_kv_heads, self.head_dim
        if self.qkv is not None:
            # q, k and v heads side by side: q and k rotate by the same angles, so in one pass
            # (fewer small ops per layer: they, not the products, are what grows with depth)
            qkv = self.qkv.whole(x).view(1, N, h + 2 * kvh, hd)
            qk = apply_rope(qkv[:, :, : h + kvh], rope)[0]
            q, k, v = qk[:, :h], qk[:, h:], qkv[0, :, h + kvh:]
        else:
            q = apply_rope(self.wq(x).view(1, N, h, hd), rope)[0]
            k = apply_rope(self.wk(x).view(1, N, kvh, hd), rope)[0]
            v = self.wv(x).view(N, kvh, hd)
        outs = []
        for p in parts:
            B, T = p.pos.shape
            self.cache_k[p.write_blocks, :, p.write_offsets] = k[p.tokens]  # (B T, kvh, hd) at their positions
            self.cache_v[p.write_blocks, :, p.write_offsets] = v[p.tokens]
            if T == 1 and x.device.type == "cpu":  # decode rows: C reads their blocks in place
                out = cpu_kernels.paged_attention(q[p.tokens], p.tables, p.pos, self.cache_k, self.cache_v)
                if out is not None:
                    outs.append(out)
                    continue
            qp = q[p.tokens].view(B, T, h, hd).transpose(1, 2)  # (B, heads, T, hd)
            keys, values = p.gather(self.cache_k), p.gather(self.cache_v)
            outs.append(attention(qp, keys, values, p.mask).transpose(1, 2).reshape(B * T, h * hd))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.wo(out[None])


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = ColumnLinear(args.dim, args.ffn_hidden)
        self.w2 = RowLinear(args.ffn_hidden, args.dim)
        self.w3 = ColumnLinear(args.dim, args.ffn_hidden)
        self.w13: FusedColumns | None = None  # fuse_linears

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x) if self.w13 is not None else (self.w1(x), self.w3(x))
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, parts):
        h = x + self.attention(self.attention_norm(x), rope, parts)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = ColumnLinear(args.dim, args.vocab_size, gather_output=True)
        self.rope: torch.Tensor | None = None
        # float32 single-row CPU steps run their products in OpenBLAS (matmul_t) when the C
        # kernels are not built; quantized layers (quant.prepare_quantized) run in torch's pool only
        self.single_row_openblas = True
        self.block_size = 0  # setup_cache: positions per KV block, and blocks in the pool
        self.kv_blocks = 0
        self._decode_plan: native_decode.DecodePlan | bool | None = None  # native_decode.plan_for

    def products(self):
        """Every matrix product of the model once: a fused group in place of its layers."""
        for block in self.layers:
            att, ffn = block.attention, block.feed_forward
            yield from (att.qkv,) if att.qkv is not None else (att.wq, att.wk, att.wv)
            yield att.wo
            yield from (ffn.w13,) if ffn.w13 is not None else (ffn.w1, ffn.w3)
            yield ffn.w2
        yield self.output

    def setup_cache(self, max_batch_size: int, max_seq_len: int, device: torch.device | str, dtype: torch.dtype,
                    kv_tokens: int | None = None, block_size: int = KV_BLOCK_SIZE) -> None:
        """Allocate the KV pool and the rotary table (after weights are loaded): blocks for
        `kv_tokens` positions (default: max_batch_size sequences of max_seq_len, which also lets
        `forward` give sequence b of a batch the blocks of row b), shared by at most
        max_batch_size running sequences of up to max_seq_len tokens each."""
        self.args.max_batch_size, self.args.max_seq_len = max_batch_size, max_seq_len
        self.block_size = block_size
        self.kv_blocks = -(-(kv_tokens or max_batch_size * self.blocks_per_row * block_size) // block_size)
        for layer in self.layers:
            att = layer.attention
            shape = (self.kv_blocks, att.n_local_kv_heads, block_size, att.head_dim)
            att.cache_k = torch.zeros(shape, device=device, dtype=dtype)
            att.cache_v = torch.zeros(shape, device=device, dtype=dtype)
        self.rope = rope_table(self.args, max_seq_len, device)
        self.invalidate_decode_plan()

    def share_cache(self, other: "Transformer") -> None:
        """Read and write `other`'s KV pool instead of a pool of this model's own: for a self-draft
        (speculative decoding with the served checkpoint's own weights quantized), whose layers and
        heads are the served model's, so the same pool layout. The draft then attends over the
        served model's keys of every accepted position (no prompt to read again, no second pool in
        memory) and writes only at the positions it proposes for, which the verification step
        writes over with the served model's keys before anything reads them (engine.draft)."""
        for mine, theirs in zip(self.layers, other.layers):
            a, b = mine.attention, theirs.attention
            if len(self.layers) != len(other.layers) or a.cache_k is None or b.cache_k is None \
                    or (a.n_local_kv_heads, a.head_dim, a.cache_k.dtype) != (b.n_local_kv_heads, b.head_dim, b.cache_k.dtype):
                raise ValueError("a model shares only a KV pool of its own layout (layers, KV heads, head dim, dtype)")
            a.cache_k, a.cache_v = b.cache_k, b.cache_v
        self.kv_blocks, self.block_size = other.kv_blocks, other.block_size
        self.args.max_batch_size, self.args.max_seq_len = other.args.max_batch_size, other.args.max_seq_len
        self.rope = rope_table(self.args, other.args.max_seq_len, other.rope.device)  # its own rope settings
        self.invalidate_decode_plan()

    def shares_cache_with(self, other: "Transformer") -> bool:
        return self.layers[0].attention.cache_k is other.layers[0].attention.cache_k

    @property
    def blocks_per_row(self) -> int:
        """Blocks of one sequence of max_seq_len positions."""
        return -(-self.args.max_seq_len // self.block_size)

    def row_tables(self, rows: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """Block tables for callers that think in cache rows (`forward`, tests, GPTQ): row r owns the
        blocks r * blocks_per_row onwards, as many as max_seq_len positions take."""
        n = self.blocks_per_row
        if (max(rows) + 1) * n > self.kv_blocks:
            raise IndexError(f"cache row {max(rows)} is past a KV pool of {self.kv_blocks} blocks of {self.block_size}")
        return torch.stack([torch.arange(r * n, (r + 1) * n, device=device) for r in rows])

    def invalidate_decode_plan(self) -> None:
        """Forget the C decode step's plan (its addresses of weights and caches): whoever changes a
        weight or the cache calls this; the plan is built again at the next step, on every rank
        alike (every rank changes its model at the same point of the job)."""
        self._decode_plan = None

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, slots: slice | list[int] | torch.Tensor, kv_len: int,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, pos: (B, T) ids and their absolute positions; slots: the cache row of each of
        the B sequences (row_tables); kv_len: keys to attend to (max position + 1). Returns float32
        logits at `logits_at` (B,) indices into T, or at every position when None."""
        B, T = tokens.shape
        if isinstance(slots, slice):
            slots = range(slots.start or 0, slots.stop)
        rows = slots.tolist() if isinstance(slots, torch.Tensor) else list(slots)
        parts = [Part.of(0, self.row_tables(rows, tokens.device), pos, self.block_size)]
        flat_at = None if logits_at is None else torch.arange(B, device=tokens.device) * T + logits_at
        logits = self.step(tokens.reshape(-1), pos.reshape(-1), parts, flat_at, every_rank=True)
        return logits if logits_at is not None else logits.view(B, T, -1)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, pos: torch.Tensor, parts: list[Part],
             logits_at: torch.Tensor | None = None, every_rank: bool = False) -> torch.Tensor:
        """One forward over a ragged batch: tokens, pos (N,) of every part side by side (decode rows
        and prefill chunks alike), so each weight is read once. Returns float32 logits (M, V) at
        the `logits_at` (M,) indices only (the output layer and its vocabulary gather run for
        those alone), or (N, V) when None. The logits are gathered to rank 0 only, which alone
        samples (vLLM's rule): the other ranks get (M, 0), unless every_rank."""
        N = tokens.shape[0]
        if tokens.device.type == "cpu":
            openblas = self.single_row_openblas and N == 1 and cpu_kernels.native() is None
            cpu_kernels.set_cpu_threads(openblas)
        h = self.tok_embeddings(tokens[None])  # (1, N, dim)
        if h.device.type == "cpu" and N > 0:
            plan = native_decode.plan_for(self)
            if plan is not None and plan.takes(N):  # a step of a CPU float32 model (decode rows, prompt chunks): its layers in C
                return native_decode.decode_step(self, plan, h[0], pos, parts, logits_at, every_rank)
        return self.torch_step(h, pos, parts, logits_at, every_rank)

    def torch_step(self, h: torch.Tensor, pos: torch.Tensor, parts: list[Part],
                   logits_at: torch.Tensor | None, every_rank: bool = True) -> torch.Tensor:
        """step() after the embedding, in torch ops: every device, dtype and kind of step."""
        rope = self.rope[pos][None]  # (1, N, head_dim/2) complex
        for layer in self.layers:
            h = layer(h, rope, parts)
        if logits_at is not None and logits_at.numel() == 0:  # a step of prompt chunks only: no output
            return h.new_zeros(0, self.args.vocab_size, dtype=torch.float32)  # layer (every rank alike)
        h = h[0] if logits_at is None else h[0, logits_at]
        return self.logits(self.norm(h), every_rank)

    def logits(self, x: torch.Tensor, every_rank: bool = True) -> torch.Tensor:
        """float32 logits (M, V) of the normed hidden states x (M, dim): the vocabulary-parallel output
        layer's slices gathered on every rank, or on rank 0 only (the others get (M, 0))."""
        if every_rank or not self.output.gather_output:
            return self.output(x).float()
        return gather_last_to_first(self.output._mm(x), get_model_parallel_group()).float()
