"""The quantized Column/RowLinear layers and embedding that run weight-only quantized weights
(formats, round-to-nearest and GPTQ maths: quant_format.py), and the model-wide steps on them:
swap the float layers for empty quantized ones, quantize one rank's slice at load, ready each
layer's product for the machine, and say what the model holds.

What is quantized: every ColumnLinear / RowLinear (wq wk wv wo w1 w2 w3 and output), and with
QuantSpec.embedding the token embedding. The norms stay float: they are tiny. Activations stay
float (weight-only quantization): the point is to read 4x / 8x fewer weight bytes per token,
which is what batch-1 decoding is bound by.

Quantized layers subclass model.ColumnLinear / RowLinear and override only `_mm`: gather and
all-reduce stay fairscale's, unchanged. `prepare_quantized` picks each layer's product for the
machine (the first kernel that exists there and agrees with the dequantized product on a probe):
on CPU in float32 the C kernels of cpu_kernels.py (llama.cpp's scheme: activations quantized to
int8 in blocks of 32, integer dot products; they read 4x / 6.4x fewer bytes than float32 and run
faster by about that), for int8 else fbgemm's dynamic linear; on CUDA torch's int8 / int4
weight-only kernels. The fallback dequantizes inside the product: int8 as gpt-fast does
(`F.linear(x, q.to(x.dtype)) * scales`), int4 group-wise then a float product.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import get_model_parallel_group
from torch import nn

from . import cpu_kernels
from .parallel import all_gather_last
from .quant_format import (INT4_SCALE_DTYPE, QuantSpec, check_group_size, dequantize_int4, dequantize_int8,
                           quantize_int4_rtn, quantize_int8)
from .transformer import ColumnLinear, Embedding, RowLinear, matmul_t, skip_fairscale_init


# --------------------------------------------------------------------------------------------
# Quantized layers


def _probe_agrees(fast: Callable[[torch.Tensor], torch.Tensor], slow: Callable[[torch.Tensor], torch.Tensor],
                  in_features: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether an optional kernel exists here and gives the dequantized product on a random input."""
    x = torch.randn(3, in_features, dtype=dtype, device=device, generator=torch.Generator(device).manual_seed(0))
    try:
        a, b = fast(x).float(), slow(x).float()
    except (RuntimeError, NotImplementedError, AttributeError, MemoryError, OSError):
        return False
    return a.shape == b.shape and bool(((a - b).abs().max() <= 2e-2 * b.abs().max() + 1e-3).item())


class _Int8:
    """int8 per-row storage and product; mixed into ColumnLinear / RowLinear before them."""

    def _init_quant(self, rows: int, cols: int) -> None:
        del self.weight  # fairscale's float Parameter (on meta): replaced by integer buffers
        self.register_buffer("weight", torch.empty(rows, cols, dtype=torch.int8, device="meta"))
        self.register_buffer("scales", torch.empty(rows, dtype=torch.float32, device="meta"))
        self.kernel = "dequant"

    def prepare(self, dtype: torch.dtype, kernels: tuple[str, ...] | None = None) -> None:
        """Choose the product for this machine, the first of `kernels` (default: the order below)
        that exists here and agrees with the dequantized product on a probe:
        - CPU, float32: "native" (cpu_kernels' C kernel built for this CPU: reads the int8 weights
          at memory speed, 3-4x float32 at batch 1 here), "fbgemm" (torch's dynamic int8 linear),
          "int8pack-1row" (torch's weight-only kernel for single rows: 3x slower than float32
          here, still faster than dequantizing), else "dequant";
        - CUDA: "int8pack" (torch's weight-only kernel for every product), else "dequant"."""
        self.scales = self.scales.to(dtype).contiguous()
        rows, cols = self.weight.shape
        slow = lambda x: F.linear(x, self.weight.to(x.dtype)) * self.scales  # noqa: E731
        cpu = self.weight.device.type == "cpu"
        if kernels is None:
            kernels = ("native", "fbgemm", "int8pack-1row") if cpu and dtype == torch.float32 else ("int8pack",)
        self.kernel = "dequant"
        for name in kernels:
            if name == "native" and cpu and dtype == torch.float32 and cols % cpu_kernels.QK == 0 and cpu_kernels.native():
                fast = lambda x: cpu_kernels.native_int8_linear(x, self.weight, self.scales)  # noqa: E731
            elif name == "fbgemm" and cpu and dtype == torch.float32 and cpu_kernels.fbgemm_available():
                try:
                    self.fbgemm_packed = cpu_kernels.fbgemm_int8_pack(self.weight, self.scales)
                except (RuntimeError, NotImplementedError, AttributeError):
                    continue
                fast = lambda x: cpu_kernels.fbgemm_int8_linear(x, self.fbgemm_packed)  # noqa: E731
            elif name in ("int8pack", "int8pack-1row") and hasattr(torch, "_weight_int8pack_mm") and (name == "int8pack") != cpu:
                fast = lambda x: torch._weight_int8pack_mm(x, self.weight, self.scales)  # noqa: E731
            else:
                continue
            if _probe_agrees(fast, slow, cols, dtype, self.weight.device):
                self.kernel = name
                break
        if self.kernel != "fbgemm":
            self.fbgemm_packed = None

    def native_spec(self) -> cpu_kernels.ProductSpec | None:
        """This product for the C decode step (native_decode.py), when it runs the native kernel."""
        return cpu_kernels.ProductSpec.int8(self.weight, self.scales) if self.kernel == "native" else None

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "native":
            return cpu_kernels.native_int8_linear(x, self.weight, self.scales)
        if self.kernel == "fbgemm":
            return cpu_kernels.fbgemm_int8_linear(x, self.fbgemm_packed)
        if self.kernel == "int8pack" or (self.kernel == "int8pack-1row" and x.numel() == x.shape[-1]):
            return torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scales).view(*x.shape[:-1], -1)
        # the int8 -> float conversion is the dequantization; the scale applies to whole output rows
        return matmul_t(x, self.weight.to(x.dtype), openblas=False) * self.scales


class _Int4:
    """int4 group-wise storage and product; mixed into ColumnLinear / RowLinear before them."""

    def _init_quant(self, rows: int, cols: int, group_size: int) -> None:
        check_group_size(cols, group_size)
        del self.weight
        self.group_size = group_size
        groups = cols // group_size
        self.register_buffer("weight", torch.empty(rows, cols // 2, dtype=torch.uint8, device="meta"))
        self.register_buffer("scales", torch.empty(rows, groups, dtype=INT4_SCALE_DTYPE, device="meta"))
        self.register_buffer("zeros", torch.empty(rows, groups, dtype=INT4_SCALE_DTYPE, device="meta"))
        self.kernel = "dequant"

    def prepare(self, dtype: torch.dtype, kernels: tuple[str, ...] | None = None) -> None:
        """On CPU in float32, "native": cpu_kernels' C kernel for this CPU (group sizes that are
        multiples of 32), which reads the stored layout as it is. On CUDA in bfloat16, "int4pack":
        torch's tinygemm int4 kernel (gpt-fast's path) when it takes this shape; afterwards `weight`
        holds the kernel's int32 tiles, no longer the checkpoint layout. Otherwise (or when a probe
        disagrees) scales and zeros stay float16 and each product dequantizes ("dequant")."""
        rows, cols = self.weight.shape[0], self.weight.shape[1] * 2
        slow = lambda x: F.linear(x, dequantize_int4(self.weight, self.scales, self.zeros, self.group_size, x.dtype))  # noqa: E731
        self.kernel = "dequant"
        if kernels is None:
            kernels = ("native",) if self.weight.device.type == "cpu" else ("int4pack",)
        if ("native" in kernels and self.weight.device.type == "cpu" and dtype == torch.float32
                and self.group_size % cpu_kernels.QK == 0 and cpu_kernels.native()):
            self.scales, self.zeros = self.scales.contiguous(), self.zeros.contiguous()
            fast = lambda x: cpu_kernels.native_int4_linear(x, self.weight, self.scales, self.zeros, self.group_size)  # noqa: E731
            if _probe_agrees(fast, slow, cols, dtype, self.weight.device):
                self.kernel = "native"
            return
        if not ("int4pack" in kernels and self.weight.device.type == "cuda" and dtype == torch.bfloat16 and rows % 8 == 0
                and self.group_size in (32, 64, 128, 256) and cols % 32 == 0):
            return
        tiles = 8 if cols % 128 == 0 else 4 if cols % 64 == 0 else 2
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack(self.weight.contiguous(), tiles)
        except (RuntimeError, NotImplementedError, AttributeError):
            return
        sz = torch.stack((self.scales, self.zeros), dim=-1).to(dtype).transpose(0, 1).contiguous()  # (groups, rows, 2)
        fast = lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, self.group_size, sz)  # noqa: E731
        if _probe_agrees(fast, slow, cols, dtype, self.weight.device):
            del self.scales, self.zeros
            self.weight, self.kernel, self.out_local = packed, "int4pack", rows
            self.register_buffer("scales_and_zeros", sz, persistent=False)

    def native_spec(self) -> cpu_kernels.ProductSpec | None:
        if self.kernel != "native":
            return None
        return cpu_kernels.ProductSpec.int4(self.weight, self.scales, self.zeros, self.group_size)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "native":
            return cpu_kernels.native_int4_linear(x, self.weight, self.scales, self.zeros, self.group_size)
        if self.kernel == "int4pack":
            y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.group_size,
                                                   self.scales_and_zeros)
            return y.view(*x.shape[:-1], self.out_local)
        w = dequantize_int4(self.weight, self.scales, self.zeros, self.group_size, x.dtype)
        return matmul_t(x, w, openblas=False)


class FusedQuantColumns:
    """Quantized column-parallel layers that read the same input (wq wk wv; w1 w3) as one native
    product: the input is quantized once and the C kernel is called once instead of 2-3 times.
    As model.FusedColumns: the layers' buffers become row blocks (views) of the fused ones, so
    memory and state dicts are unchanged."""

    def __init__(self, layers: list[nn.Module]):
        self.sizes = [m.weight.shape[0] for m in layers]
        self.int4 = isinstance(layers[0], _Int4)
        self.group_size = layers[0].group_size if self.int4 else 0
        for name in ("weight", "scales", "zeros") if self.int4 else ("weight", "scales"):
            fused = torch.cat([getattr(m, name) for m in layers])
            setattr(self, name, fused)
            for m, part in zip(layers, fused.split(self.sizes)):
                setattr(m, name, part)  # the layers keep working (and saving) on their own rows

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """The layers' outputs side by side, unsplit."""
        if self.int4:
            return cpu_kernels.native_int4_linear(x, self.weight, self.scales, self.zeros, self.group_size)
        return cpu_kernels.native_int8_linear(x, self.weight, self.scales)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.whole(x).split(self.sizes, dim=-1)

    def native_spec(self) -> cpu_kernels.ProductSpec:
        if self.int4:
            return cpu_kernels.ProductSpec.int4(self.weight, self.scales, self.zeros, self.group_size)
        return cpu_kernels.ProductSpec.int8(self.weight, self.scales)


def fuse_quantized(model: nn.Module) -> None:
    """Fuse each block's wq/wk/wv and w1/w3 when they run the native kernel (after prepare_quantized)."""
    def fusable(layers) -> bool:
        return (all(getattr(m, "kernel", None) == "native" for m in layers) and len({type(m) for m in layers}) == 1
                and len({getattr(m, "group_size", 0) for m in layers}) == 1)

    for block in model.layers:
        att, ffn = block.attention, block.feed_forward
        if fusable((att.wq, att.wk, att.wv)):
            att.qkv = FusedQuantColumns([att.wq, att.wk, att.wv])
        if fusable((ffn.w1, ffn.w3)):
            ffn.w13 = FusedQuantColumns([ffn.w1, ffn.w3])
    model.invalidate_decode_plan()


class Int8ColumnLinear(_Int8, ColumnLinear):
    def __init__(self, in_features: int, out_features: int, gather_output: bool = False):
        ColumnLinear.__init__(self, in_features, out_features, gather_output)
        self._init_quant(self.output_size_per_partition, in_features)


class Int8RowLinear(_Int8, RowLinear):
    def __init__(self, in_features: int, out_features: int):
        RowLinear.__init__(self, in_features, out_features)
        self._init_quant(out_features, self.input_size_per_partition)


class Int4ColumnLinear(_Int4, ColumnLinear):
    def __init__(self, in_features: int, out_features: int, group_size: int, gather_output: bool = False):
        ColumnLinear.__init__(self, in_features, out_features, gather_output)
        self._init_quant(self.output_size_per_partition, in_features, group_size)


class Int4RowLinear(_Int4, RowLinear):
    def __init__(self, in_features: int, out_features: int, group_size: int):
        RowLinear.__init__(self, in_features, out_features)
        self._init_quant(out_features, self.input_size_per_partition, group_size)


QUANTIZED = (_Int8, _Int4)


class QuantEmbedding(Embedding):
    """The token embedding stored as int8 rows (one scale per vocabulary row) or int4 groups
    along the row: a lookup reads the integer rows of the batch's tokens and dequantizes only
    those. The table's rows are split by feature like the float ParallelEmbedding's."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantSpec):
        super().__init__(num_embeddings, embedding_dim)
        cols = self.embedding_dim_per_partition
        del self.weight
        self.method, self.group_size, self.dtype = spec.method, spec.group_size, torch.float32
        if spec.method == "int8":
            self.register_buffer("weight", torch.empty(num_embeddings, cols, dtype=torch.int8, device="meta"))
            self.register_buffer("scales", torch.empty(num_embeddings, dtype=torch.float32, device="meta"))
        else:
            check_group_size(cols, spec.group_size)
            groups = (num_embeddings, cols // spec.group_size)
            self.register_buffer("weight", torch.empty(num_embeddings, cols // 2, dtype=torch.uint8, device="meta"))
            self.register_buffer("scales", torch.empty(groups, dtype=INT4_SCALE_DTYPE, device="meta"))
            self.register_buffer("zeros", torch.empty(groups, dtype=INT4_SCALE_DTYPE, device="meta"))

    def prepare(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.reshape(-1)
        if self.method == "int8":
            rows = dequantize_int8(self.weight[ids], self.scales[ids], self.dtype)
        else:
            rows = dequantize_int4(self.weight[ids], self.scales[ids], self.zeros[ids], self.group_size, self.dtype)
        return all_gather_last(rows.view(*tokens.shape, -1), get_model_parallel_group())


def _quantized_like(layer: nn.Module, spec: QuantSpec) -> nn.Module:
    """An empty (meta) quantized layer with `layer`'s global sizes and parallel role."""
    with torch.device("meta"), skip_fairscale_init():
        if isinstance(layer, ColumnLinear):
            if spec.method == "int8":
                return Int8ColumnLinear(layer.in_features, layer.out_features, layer.gather_output)
            return Int4ColumnLinear(layer.in_features, layer.out_features, spec.group_size, layer.gather_output)
        if spec.method == "int8":
            return Int8RowLinear(layer.in_features, layer.out_features)
        return Int4RowLinear(layer.in_features, layer.out_features, spec.group_size)


def _linears(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(name, parent, attribute, layer) of every float Column/RowLinear."""
    found = []
    for pname, parent in model.named_modules():
        for attr, child in parent.named_children():
            if isinstance(child, (ColumnLinear, RowLinear)) and not isinstance(child, QUANTIZED):
                found.append((f"{pname}.{attr}" if pname else attr, parent, attr, child))
    return found


def replace_linears(model: nn.Module, spec: QuantSpec) -> None:
    """Swap every float Column/RowLinear (and with spec.embedding the embedding) for an empty
    quantized one (meta tensors, to be filled by load_state_dict(..., assign=True) with a
    quantized state)."""
    for _, parent, attr, layer in _linears(model):
        setattr(parent, attr, _quantized_like(layer, spec))
    if spec.embedding:
        emb = model.tok_embeddings
        model.tok_embeddings = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, spec)


def quantize_weight(name: str, w: torch.Tensor, spec: QuantSpec, columns_split: bool) -> dict[str, torch.Tensor]:
    """This rank's slice `w` of linear weight `name` -> the quantized tensors a checkpoint stores
    for it (round-to-nearest). A weight split by its input columns (a row-parallel layer, the
    embedding: the split table says which) has its int8 row maxima all-reduced over the
    model-parallel group, so every rank count gives the integers of the whole matrix."""
    base = name[: -len(".weight")]
    if spec.method == "int8":
        amax = w.detach().float().abs().amax(dim=1)
        if columns_split and _mp_world() > 1:
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=get_model_parallel_group())
        q, scales = quantize_int8(w, amax)
        return {name: q, base + ".scales": scales}
    packed, scales, zeros = quantize_int4_rtn(w, spec.group_size)
    return {name: packed, base + ".scales": scales, base + ".zeros": zeros}


def _mp_world() -> int:
    from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size

    return get_model_parallel_world_size() if dist.is_initialized() else 1

def prepare_quantized(model: nn.Module, dtype: torch.dtype) -> None:
    """After loading: each quantized layer readies its product for `dtype` on its device."""
    for m in model.modules():
        if isinstance(m, (*QUANTIZED, QuantEmbedding)):
            m.prepare(dtype)
    model.single_row_openblas = False  # quantized products run in torch's threads (cpu_kernels.set_cpu_threads)


def weights_label(model: nn.Module) -> str:
    """The compute dtype, with "+int8" / "+int4" when the linear layers are quantized (by
    --quantize or as stored): result lines name it, since the float dtype alone would hide it."""
    dtype = str(model.norm.weight.dtype).replace("torch.", "")
    for m in model.modules():
        if isinstance(m, (_Int8, _Int4)):
            return f"{dtype}+{'int8' if isinstance(m, _Int8) else 'int4'}"
    return dtype


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes this rank holds for its linear layers' and embedding's weights, scales and zeros;
    bytes the same weights take in float32). The norms (a few KB) are left out; a tensor two
    layers share (a tied output layer and embedding, loading.share_tied_output) counts once."""
    held = f32 = 0
    seen: set[int] = set()

    def new_bytes(tensors) -> int:
        fresh = [t for t in tensors if t.data_ptr() not in seen]
        seen.update(t.data_ptr() for t in fresh)
        return sum(t.numel() * t.element_size() for t in fresh)

    for m in model.modules():
        if isinstance(m, Embedding):
            held += new_bytes((*m.buffers(recurse=False), *m.parameters(recurse=False)))
            f32 += m.num_embeddings * m.embedding_dim_per_partition * 4
        if isinstance(m, (ColumnLinear, RowLinear)):
            tensors = [t for n, t in m.named_buffers(recurse=False)] + [p for p in m.parameters(recurse=False)]
            held += new_bytes(tensors)
            rows = m.output_size_per_partition if isinstance(m, ColumnLinear) else m.out_features
            cols = m.in_features if isinstance(m, ColumnLinear) else m.input_size_per_partition
            f32 += rows * cols * 4
    return held, f32
