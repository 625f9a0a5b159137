"""The quantized weight formats and the maths that produce them, on one weight matrix (out, in),
with no layer or process group in sight: the quantized layers (quant.py), the loader and the
quantize command (weights/) all build on these.

- int8: symmetric, one scale per output row: w ~ q * scale, q in [-127, 127], scale = max|w| / 127.
  On a rank-split row-parallel layer the row maximum is all-reduced first (quant.quantize_weight),
  so on-the-fly int8 gives the same integers on any rank count as the quantize command does on
  the whole matrix.
- int4: asymmetric, one scale and one zero per group of `group_size` input columns:
  w ~ (q - 8) * scale + zero, q in [0, 15], scale = (max - min) / 15, zero = min + 8 * scale --
  the convention of gpt-fast and of torch's `_weight_int4pack_mm`, so CUDA can use that kernel
  as stored. Two values per byte (column 2j high nibble, 2j+1 low). Scales and zeros are float16
  (8 bytes per group would cost 6.4x instead of 7.1x at group 64; float16 keeps 11 bits, ample
  next to a 4-bit step). Groups never straddle ranks (QuantSpec.check).
- GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
  Pre-trained Transformers"; reference: IST-DASLab/gptq, gpt-fast's GPTQ.py): quantizes one input
  column at a time and spreads each column's rounding error over the columns not yet quantized,
  weighted by the inverse Hessian H^-1 of the layer's inputs (H = 2 X^T X over calibration tokens),
  so the layer's outputs on such inputs, not its weights, stay close. It needs calibration
  activations, so only the quantize command (llama_demo.quantize) runs it; `--quantize int4` at
  load uses round-to-nearest.
- QuantSpec: params.json's "quantization" entry, the one description of a quantized checkpoint's
  tensors (a fact of the model's weights: the checkpoint code reads and writes it, the layers
  are built from it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, ModelArgs

INT4_SCALE_DTYPE = torch.float16
# Default int4 group: 32 input columns, as llama.cpp's 4-bit formats. Bytes per weight with float16
# scale + zero: 0.625 (6.4x below float32) at 32, 0.5625 (7.1x) at 64, 0.53 (7.5x) at 128.
# Perplexity on SmolLM2-135M (GPTQ): +0.4% at 32, +10% at 64 -- but that model's float weights
# are themselves dequantized Q4_1 (llama.cpp, groups of 32), which group 32 reproduces exactly.
DEFAULT_GROUP_SIZE = 32


class QuantError(ConfigError):
    """A quantization setting (or a checkpoint's "quantization" entry) does not fit the model; the
    message says what to change."""


QUANT_METHODS = ("int8", "int4")
QUANT_ALGORITHMS = ("rtn", "gptq")
QUANT_AUX = (".scales", ".zeros")  # suffixes of a quantized linear's companions of X.weight


@dataclass(frozen=True)
class QuantSpec:
    """params.json's "quantization" entry: how a checkpoint written by llama_demo.quantize stores
    each linear layer's `X.weight`, and with `"embedding": true` the token embedding's as well
    (a table of vocab rows, quantized like a row-parallel layer); the norms stay float.

    int8: `X.weight` int8 (out, in) and `X.scales` (out,), w = q * scale (symmetric, per output row).
    int4: `X.weight` uint8 (out, in/2), two 4-bit values per byte, column 2j in the high nibble and
    2j+1 in the low one; `X.scales`, `X.zeros` (out, in/group_size) float16, w = (q - 8) * scale + zero
    (asymmetric, per group of group_size input columns: the convention of torch's int4pack kernels).
    Splits follow the split table: a column-parallel layer splits weight, scales and zeros along its
    rows; a row-parallel one along its input columns, so int4 groups go with their columns (each
    part must hold whole groups) and int8's per-row scales are replicated.
    `algorithm` says how the integers were chosen (round-to-nearest or GPTQ); loading ignores it."""

    method: str
    group_size: int = 0  # int4 only
    algorithm: str = "rtn"
    embedding: bool = False  # tok_embeddings.weight quantized too (checkpoints before it: float)

    def to_params(self) -> dict:
        d: dict = {"method": self.method, "algorithm": self.algorithm}
        if self.method == "int4":
            d["group_size"] = self.group_size
        if self.embedding:
            d["embedding"] = True
        return d

    @classmethod
    def from_params(cls, raw: object, source: str) -> "QuantSpec":
        if not isinstance(raw, dict) or raw.get("method") not in QUANT_METHODS:
            raise QuantError(f"{source}: \"quantization\" must be an object with \"method\" one of {', '.join(QUANT_METHODS)}; got {raw!r}")
        algorithm = raw.get("algorithm", "rtn")
        if algorithm not in QUANT_ALGORITHMS:
            raise QuantError(f"{source}: quantization algorithm must be one of {', '.join(QUANT_ALGORITHMS)}; got {algorithm!r}")
        group = raw.get("group_size", 0)
        if raw["method"] == "int4" and (isinstance(group, bool) or not isinstance(group, int) or group < 2 or group % 2):
            raise QuantError(f"{source}: int4 quantization needs an even integer group_size >= 2; got {group!r}")
        embedding = raw.get("embedding", False)
        if not isinstance(embedding, bool):
            raise QuantError(f"{source}: quantization \"embedding\" must be true or false; got {embedding!r}")
        return cls(raw["method"], group if raw["method"] == "int4" else 0, algorithm, embedding)

    def check(self, args: ModelArgs, parts: int = 1, what: str = "rank") -> None:
        """int4 groups must tile every linear layer's input, and each of `parts` row-parallel
        slices must hold whole groups (a group cut between two ranks has no scale of its own)."""
        if self.method != "int4":
            return
        g = self.group_size
        for size, layers in ((args.dim, "wq/wk/wv/w1/w3/output (dim)"), (args.ffn_hidden, "w2 (FFN hidden size)")):
            if size % g:
                raise QuantError(f"int4 group size {g} does not divide the input size {size} of {layers}; "
                                      f"choose a group size that divides {size}, e.g. {pow2_divisor(size, 128)}")
        split = [(args.n_heads * args.head_dim, "wo"), (args.ffn_hidden, "w2")] + ([(args.dim, "the embedding")] if self.embedding else [])
        for size, layer in split:
            if parts > 1 and (size % parts or (size // parts) % g):
                raise QuantError(f"{parts} {what}s would cut int4 groups: {layer}'s {size} inputs form {size // g} groups of {g} "
                                      f"and each {what} must hold whole groups; use a {what} count that divides {size // g}, "
                                      f"or quantize with a smaller --group_size")


def pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap dividing n (a group size that tiles n)."""
    g = cap
    while g > 1 and n % g:
        g //= 2
    return g


# --------------------------------------------------------------------------------------------
# Pure functions on one weight matrix (out, in)


def quantize_int8(w: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: (q int8 (out, in), scales float32 (out,)), w ~ q * scales[:, None].
    `amax`: the rows' max |w| when it must come from more than this tensor (a rank-split row)."""
    w = w.detach().float()
    if amax is None:
        amax = w.abs().amax(dim=1)
    scales = amax.float().clamp(min=1e-12) / 127.0  # an all-zero row gets q = 0, any scale will do
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return q.to(dtype) * scales.to(dtype)[:, None]


def check_group_size(in_features: int, group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise QuantError(f"int4 group size must be an even integer >= 2, got {group_size!r}")
    if in_features % group_size:
        raise QuantError(f"int4 group size {group_size} does not divide the {in_features} input columns; "
                         f"choose a divisor of {in_features} such as {pow2_divisor(in_features, DEFAULT_GROUP_SIZE)}")


def default_group_size(args: ModelArgs) -> int:
    """DEFAULT_GROUP_SIZE, or the largest power of two below it that divides every linear layer's
    input size (dim and the FFN hidden size) when it does not."""
    g = pow2_divisor(args.dim, DEFAULT_GROUP_SIZE)
    g = pow2_divisor(args.ffn_hidden, g)
    if g < 2:
        raise QuantError(f"no even int4 group size divides dim {args.dim} and FFN size {args.ffn_hidden}")
    return g


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) integers in [0, 15] -> uint8 (out, in/2): column 2j in the high nibble, 2j+1 low
    (the byte layout torch's _convert_weight_to_int4pack takes)."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (out, in/2) -> uint8 (out, in) values in [0, 15]."""
    return torch.stack((packed >> 4, packed & 15), dim=-1).view(packed.shape[0], -1)


def int4_qparams(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scales and zeros of each group, rounded to their stored float16 (out, in/group_size):
    quantizing against the rounded values makes the stored integers fit the stored parameters."""
    rows, cols = w.shape
    check_group_size(cols, group_size)
    wg = w.detach().float().view(rows, cols // group_size, group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-6).to(INT4_SCALE_DTYPE)
    zeros = (lo + 8 * scales.float()).to(INT4_SCALE_DTYPE)
    if not (torch.isfinite(scales).all() and torch.isfinite(zeros).all()):
        raise QuantError(f"weights up to {wg.abs().max().item():.3g} overflow float16 int4 scales")
    return scales, zeros


def _int4_round(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Integers in [0, 15] for w (..., n) against broadcastable float scales and zeros."""
    return torch.round((w - (zeros - 8 * scales)) / scales).clamp_(0, 15)


def quantize_int4_rtn(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric int4 by rounding to nearest: (packed uint8 (out, in/2),
    scales float16 (out, groups), zeros float16 (out, groups))."""
    rows, cols = w.shape
    scales, zeros = int4_qparams(w, group_size)
    wg = w.detach().float().view(rows, cols // group_size, group_size)
    q = _int4_round(wg, scales.float()[..., None], zeros.float()[..., None]).view(rows, cols)
    return pack_int4(q), scales, zeros


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, groups = scales.shape
    s = scales.to(dtype)[..., None]
    w = unpack_int4(packed).view(rows, groups, group_size).to(dtype)
    return w.mul_(s).add_(zeros.to(dtype)[..., None] - 8 * s).view(rows, groups * group_size)  # in place: fewer passes


def gptq_int4(w: torch.Tensor, H: torch.Tensor, group_size: int, damp: float = 0.01, block: int = 128,
              act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ for one layer: (packed, scales, zeros) as quantize_int4_rtn gives, chosen to keep
    X W^T close for inputs X whose H = 2 X^T X / n is given (in, in).

    Columns are quantized left to right (with `act_order`: largest diag(H) first). Each column's
    rounding error e is pushed onto the columns not yet quantized as W[:, j] -= e * U[i, j] / U[i, i],
    with U the upper Cholesky factor of H^-1: the optimal (OBS) compensation. Lazy batching: inside a
    block of `block` columns updates stay within the block; the rest of W gets them in one product.
    Group scales and zeros are taken at each group's first column from the error-updated weights
    (so they fit what will actually be rounded); with act_order groups are visited out of order, so
    their parameters are fixed up front from the original weights ("static groups").
    `damp` * mean(diag H) is added to the diagonal so H stays invertible."""
    rows, cols = w.shape
    check_group_size(cols, group_size)
    if H.shape != (cols, cols):
        raise QuantError(f"Hessian of shape {list(H.shape)} does not fit a weight with {cols} input columns")
    W = w.detach().float().clone()
    H = H.detach().double().clone()
    dead = H.diagonal() == 0  # inputs that were always zero: nothing to compensate through them
    H[dead, dead] = 1.0
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else None
    if act_order:
        scales, zeros = int4_qparams(W, group_size)  # static groups, from the original columns
        W, H = W[:, perm], H[perm][:, perm]
    else:
        scales = torch.empty(rows, cols // group_size, dtype=INT4_SCALE_DTYPE, device=W.device)
        zeros = torch.empty_like(scales)
    H.diagonal().add_(damp * H.diagonal().mean())
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    except RuntimeError:  # torch.linalg.LinAlgError: not positive definite
        raise QuantError(f"the calibration Hessian is not positive definite even with damp={damp}; "
                         f"use more calibration tokens or a larger --damp") from None
    group_of = (perm if act_order else torch.arange(cols, device=W.device)) // group_size
    Q = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
    block = max(group_size, block // group_size * group_size)  # groups never straddle blocks
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err = torch.empty_like(W1)
        for i in range(i2 - i1):
            g = int(group_of[i1 + i])
            if not act_order and (i1 + i) % group_size == 0:
                s, z = int4_qparams(W1[:, i: i + group_size], group_size)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            s, z = scales[:, g].float(), zeros[:, g].float()
            col = W1[:, i]
            q = _int4_round(col, s, z)
            Q[:, i1 + i] = q.to(torch.uint8)
            err = (col - (q * s + z - 8 * s)) / U1[i, i]
            W1[:, i:].sub_(torch.outer(err, U1[i, i:]))
            Err[:, i] = err
        W[:, i2:].sub_(Err @ U[i1:i2, i2:])
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return pack_int4(Q), scales, zeros


def spec_for(method: str, args: ModelArgs, world_size: int = 1, group_size: int | None = None,
             algorithm: str = "rtn") -> QuantSpec:
    """The QuantSpec of `--quantize method` (group size: default_group_size unless given), checked
    against the model's shapes and the rank count."""
    if method not in QUANT_METHODS:
        raise QuantError(f"unknown quantization {method!r}; choose one of {', '.join(QUANT_METHODS)}")
    if method == "int8":
        spec = QuantSpec("int8", 0, algorithm, embedding=True)
    else:
        g = default_group_size(args) if group_size is None else group_size
        for size in (args.dim, args.ffn_hidden):
            check_group_size(size, g)
        spec = QuantSpec("int4", g, algorithm, embedding=True)
    spec.check(args, world_size, "rank")
    return spec
