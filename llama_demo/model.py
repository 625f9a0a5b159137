"""The LLaMA transformer (LLaMA 1, Llama 2, Llama 3) on fairscale's model-parallel layers.

Each rank holds 1/N of every split weight: column-parallel layers split output rows (wq, wk, wv,
w1, w3, output), row-parallel layers split input columns and all-reduce (wo, w2), and the
embedding splits its feature dimension. References: Meta's llama/model.py, gpt-fast's model.py.

The KV cache is static: one row ("slot") per concurrent sequence, so sequences of different
lengths decode together, each at its own position. That is what continuous batching stands on.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
import fairscale.nn.model_parallel.layers as fairscale_layers
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region, reduce_from_model_parallel_region
from torch import nn

from .config import ModelArgs


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


def matmul_t(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T. On CPU in float32 numpy's OpenBLAS reads weights about 1.5x faster than torch's
    MKL on the AMD machines we measured (FORMATS.md); both are zero-copy views of one buffer."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32 and not torch.is_grad_enabled():
        x2 = x.reshape(-1, x.shape[-1])
        out = np.matmul(x2.numpy(), w.detach().numpy().T)
        return torch.from_numpy(out).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


class ColumnLinear(ColumnParallelLinear):
    """ColumnParallelLinear (no bias, output left split across ranks unless gather_output)."""

    def __init__(self, in_features: int, out_features: int, gather_output: bool = False):
        super().__init__(in_features, out_features, bias=False, gather_output=gather_output, init_method=_keep)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's matrix product; quantized layers (quant.py) override only this."""
        return matmul_t(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # copy_to_model_parallel_region is the identity in the forward pass: skip it
        y = self._mm(x)
        return gather_from_model_parallel_region(y) if self.gather_output else y


class RowLinear(RowParallelLinear):
    """RowParallelLinear (no bias): input arrives split across ranks, output is all-reduced."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False, input_is_parallel=True, init_method=_keep)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return matmul_t(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_model_parallel_region(self._mm(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 whatever the weights' dtype, as Meta's code does
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse frequencies of Meta's rotary embedding, with Llama 3.1 scaling when asked."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64, device=device)[: hd // 2] / hd))
    if args.use_scaled_rope:  # Llama 3.1: stretch low frequencies for long context
        scale, low_ff, high_ff, old_len = 8.0, 1.0, 4.0, 8192
        low_wl, high_wl = old_len / low_ff, old_len / high_ff
        wavelen = 2 * math.pi / freqs
        smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
        scaled = torch.where(wavelen > low_wl, freqs / scale, freqs)
        mid = (wavelen <= low_wl) & (wavelen >= high_wl)
        freqs = torch.where(mid, (1 - smooth) * freqs / scale + smooth * freqs, scaled)
    return freqs.float()


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
    On CUDA, SDPA's fused kernels. On CPU, plain matrix products: torch's CPU flash kernel takes
    milliseconds per call for a one-token query (measured: 85% of a 110M decode step)."""
    B, h, T, hd = q.shape
    kvh = k.shape[1]
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kvh != h)
    g = h // kvh
    qg = q.reshape(B, kvh, g * T, hd)  # query heads j*g .. j*g+g-1 share KV head j
    scores = torch.matmul(qg, k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))  # (B, kvh, g*T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask.repeat(1, 1, g, 1), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).type_as(q)
    return torch.matmul(probs, v).view(B, h, T, hd)


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
        # (slots, local kv heads, max_seq_len, head_dim): heads before positions, so that a row's
        # keys for one head are one contiguous run and attention reads them without a copy
        self.cache_k: torch.Tensor | None = None
        self.cache_v: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                slots: torch.Tensor | slice, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_local_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_local_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, kv heads, T, head_dim)
        if isinstance(slots, slice):  # rows are a contiguous block of the cache: views, no copies
            where = pos[:, None, :, None].expand_as(k)
            self.cache_k[slots].scatter_(2, where, k)
            self.cache_v[slots].scatter_(2, where, v)
        else:
            rows = slots[:, None].expand(B, T)
            self.cache_k[rows, :, pos] = k.transpose(1, 2)  # indexed dims come first: (B, T, kv heads, hd)
            self.cache_v[rows, :, pos] = v.transpose(1, 2)
        keys, values = self.cache_k[slots, :, :kv_len], self.cache_v[slots, :, :kv_len]
        out = attention(q.transpose(1, 2), keys, values, mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = ColumnLinear(args.dim, args.ffn_hidden)
        self.w2 = RowLinear(args.ffn_hidden, args.dim)
        self.w3 = ColumnLinear(args.dim, args.ffn_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, mask, slots, pos, kv_len):
        h = x + self.attention(self.attention_norm(x), rope, mask, slots, pos, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = ParallelEmbedding(args.vocab_size, args.dim, init_method=_keep)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = ColumnLinear(args.dim, args.vocab_size, gather_output=True)
        self.rope: torch.Tensor | None = None

    def setup_cache(self, max_batch_size: int, max_seq_len: int, device: torch.device | str, dtype: torch.dtype) -> None:
        """Allocate the static KV cache and the rotary table (after weights are loaded)."""
        self.args.max_batch_size, self.args.max_seq_len = max_batch_size, max_seq_len
        for layer in self.layers:
            att = layer.attention
            shape = (max_batch_size, att.n_local_kv_heads, max_seq_len, att.head_dim)
            att.cache_k = torch.zeros(shape, device=device, dtype=dtype)
            att.cache_v = torch.zeros(shape, device=device, dtype=dtype)
        self.rope = rope_table(self.args, max_seq_len, device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor | slice, kv_len: int,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, pos: (B, T) ids and their absolute positions; slots: the cache row of each of
        the B sequences; kv_len: keys to attend to (max position + 1). Returns float32 logits at
        `logits_at` (B,) indices into T, or at every position when None."""
        B, T = tokens.shape
        h = self.tok_embeddings(tokens)
        rope = self.rope[pos]  # (B, T, head_dim/2) complex
        if T == 1 and B == 1:
            mask = None  # one token of one sequence sees its whole cache row (kv_len = position + 1)
        else:
            # each query sees the keys at or before its own position; the mask is
            # (B, 1, T, kv_len) because rows sit at different positions of their cache rows
            mask = (torch.arange(kv_len, device=tokens.device)[None, None, :] <= pos[:, :, None])[:, None]
        for layer in self.layers:
            h = layer(h, rope, mask, slots, pos, kv_len)
        if logits_at is not None:
            h = h[torch.arange(B, device=h.device), logits_at][:, None]  # (B, 1, dim)
        logits = self.output(self.norm(h)).float()
        return logits[:, 0] if logits_at is not None else logits

