"""CPU kernel policy: which library runs each matrix product on a CPU, and with how many threads.

On CPU the library doing the matrix products decides the speed (FORMATS.md), so the choices here
are per machine:
- float32, one row: the C library below (qkernels.c), which streams the weights near memory speed
  (OpenBLAS's gemv, the fallback without a compiler, read them ~1.5x slower; torch's pool then
  runs at one thread: two busy pools on 2 cores slow each other down 20x).
- float32, a few rows (a speculative verification, a small batch's output layer): the same C
  library, up to the row count where torch's GEMM overtakes it, probed once per process
  (c_rows_limit: on the 2-core AVX2 VM C ran 2-16 rows 1.3-5x faster than F.linear, e.g. the
  default model's 49152-row output layer at 2 rows 5.8 ms against 21.6 ms).
- float32, several rows (prefill; batched decode steps that do not run in C, native_decode.py):
  torch's GEMM (F.linear: MKL in x86 builds) on the same plain weights. Inside the C layers
  (native_decode.py) a product of more rows than c_rows_limit() calls that same sgemm (torch_sgemm,
  lend_blas): the GEMM for the product, C for the norms, rotary, attention and SiLU around it
  (SmolLM2-135M, 15 decodes + a 256-token chunk: 421 ms against 481 through the torch ops). oneDNN's blocked copy of
  each weight (pack_for_cpu) is made only on request (LLAMA_DEMO_PACK_WEIGHTS=1): it doubles the
  float32 weights held, and on the 2-core AVX2 VM F.linear on the plain weights ran 16-row steps
  and 128-token prompt chunks faster than oneDNN on its blocked copy (README, issue 25 item 5).
- int8 / int4 weights (quant.py): a small C library compiled here for this CPU on first use
  (qkernels.c, cached; llama.cpp's Q8_0 / Q4_1 scheme: activations quantized to int8 in blocks of
  32, integer dot products), else fbgemm's dynamic int8 linear, else dequantizing products.
  torch's `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` read weights 2-5x slower than
  float32 here, so they are not used on CPU.
Nothing here runs for CUDA tensors: callers check the device, and CUDA stays on torch's ops.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import cache_root
from .parallel import available_memory, cpu_threads

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def matmul_t(x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor | None = None, openblas: bool = True) -> torch.Tensor:
    """x @ w.T. On CPU in float32: up to c_rows_limit() rows through the C kernel
    (native_f32_linear); without it, one row through numpy's OpenBLAS (w read in place through a
    zero-copy view); more rows through oneDNN on `packed`, its blocked copy of w, when there is
    one, else torch's F.linear on w. `openblas=False` keeps single rows off OpenBLAS, for callers
    whose step runs in torch's threads. Elsewhere (CUDA, half precision, autograd) F.linear."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32 and not torch.is_grad_enabled():
        x2 = x.reshape(-1, x.shape[-1])
        if w.is_contiguous() and native() is not None and 0 < x2.shape[0] <= c_rows_limit():
            out = native_f32_linear(x2, w)
        elif x2.shape[0] > 1 and packed is not None:
            out = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), packed, None, "none", [], "")
        elif x2.shape[0] > 1:  # torch's BLAS (MKL in x86 builds): 1.6x oneDNN on the plain weight at 16 rows
            out = F.linear(x2, w)
        elif openblas:
            out = torch.from_numpy(np.matmul(x2.numpy(), w.detach().numpy().T))
        else:
            out = F.linear(x2, w)
        return out.view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


C_ROWS_PROBED = (8, 16, 32, 64)  # row counts c_rows_limit tries beyond the C product's 4-row tile


@functools.cache
def c_rows_limit() -> int:
    """The most rows of x a float32 matmul_t runs in the C product (0 without the C library). Up
    to its 4-row tile C streams each weight once and wins anyway; beyond, a probe on this CPU
    (C against F.linear on a 4096 x 1024 weight, the best of 5 each, at C_ROWS_PROBED rows, up
    to the first loss): a machine with AVX-512 / AMX may favour torch's GEMM sooner than the
    AVX2 VM we measured. Once per process (~0.2 s), with the threads a step uses; only speed
    depends on it (no collective), so ranks need not agree."""
    if native() is None:
        return 0
    import time

    set_cpu_threads(False)
    w, limit = torch.randn(4096, 1024), 4
    with torch.inference_mode():
        for n in C_ROWS_PROBED:
            x = torch.randn(n, 1024)
            best = {}
            for name, product in (("c", lambda: native_f32_linear(x, w)), ("torch", lambda: F.linear(x, w))):
                for _ in range(5):
                    t0 = time.perf_counter()
                    product()
                    best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
            if best["c"] > best["torch"]:
                break
            limit = n
    return limit


@functools.cache
def torch_sgemm() -> int | None:
    """The address of the sgemm_ that torch's CPU library exports (MKL's, LP64, in x86 builds: what
    F.linear itself runs), checked on one small product against F.linear; None in builds without
    MKL, or when it is missing or wrong. The C layers use it for products of many rows
    (lend_blas)."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        fn = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).sgemm_
    except (OSError, AttributeError):
        return None
    i, f = ctypes.c_int, ctypes.c_float
    fn.restype = None
    x, w = torch.randn(37, 50), torch.randn(23, 50)
    y = torch.zeros(37, 23)
    m, n, k, one, zero = i(23), i(37), i(50), f(1.0), f(0.0)
    ref = ctypes.byref
    fn(b"T", b"N", ref(m), ref(n), ref(k), ref(one), ctypes.c_void_p(w.data_ptr()), ref(k),
       ctypes.c_void_p(x.data_ptr()), ref(k), ref(zero), ctypes.c_void_p(y.data_ptr()), ref(m))
    if not torch.allclose(y, F.linear(x, w), rtol=1e-4, atol=1e-4):
        return None
    return ctypes.cast(fn, ctypes.c_void_p).value


@functools.cache
def lend_blas() -> bool:
    """Let the C layers run float32 products of more rows than c_rows_limit() through torch's sgemm
    (prompt chunks: there a GEMM's blocking wins, and the rest of the layer stays in C, fused);
    False, and every product stays in the C kernel, without MKL. Once per process; only speed
    depends on it (sgemm computes what F.linear does)."""
    lib, sgemm = native(), torch_sgemm()
    if lib is None or sgemm is None:
        return False
    lib.qk_set_sgemm(sgemm, c_rows_limit() + 1)
    return True


def pack_for_cpu(model, batch_hint: int = 16) -> int:
    """Give each float32 CPU matrix product of the model (`model.products()`: objects with
    `weight` and `packed`) a oneDNN-blocked copy of its weight for batched steps, when
    LLAMA_DEMO_PACK_WEIGHTS=1 and at least twice that memory is free. Off by default: the copy
    sits beside the plain weights (which the C decode kernels read) and doubles the float32
    weights held (SmolLM2-135M: 543 -> 1,026 MB), and on the 2-core AVX2 VM we measured oneDNN ran
    prompt chunks and 16-32-row steps as fast on the plain weights (README, issue 25 item 5); an
    earlier measurement had it 1.5x faster at 16 rows, so a machine where that holds may turn it
    on. Returns the bytes added (0 when nothing was packed)."""
    if os.environ.get("LLAMA_DEMO_PACK_WEIGHTS", "0") != "1":
        return 0
    products = [p for p in model.products() if hasattr(p, "packed") and p.weight.device.type == "cpu"
                and p.weight.dtype == torch.float32]
    need = sum(p.weight.numel() * 4 for p in products)
    if not ONEDNN or not products or need * 2 > available_memory():
        return 0
    for p in products:
        p.packed = torch.ops.mkldnn._reorder_linear_weight(p.weight.detach(), batch_hint)
    return need


def set_cpu_threads(openblas_step: bool) -> None:
    """torch's intra-op thread count for a CPU step: one while OpenBLAS runs a single-row step
    (only when the C kernels could not be built), else cpu_threads(): torch's ops and the C kernels
    share one OpenMP pool. Single-row steps too use every core: on the 2-core VM we measured, with
    nothing else running, two threads decode 1.3-1.5x faster than one (SmolLM2-135M: float32 19.7 ->
    28.2 tok/s, int8 49 -> 68.5, int4 63.5 -> 96.4). On a machine shared with other busy processes
    a barrier can wait for a descheduled thread's next time slice (we once saw 0.8 tok/s on two
    threads where one kept 34): set LLAMA_DEMO_TORCH_THREADS there (parallel.cpu_threads)."""
    n = 1 if openblas_step else cpu_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def paged_attention(q: torch.Tensor, tables: torch.Tensor, pos: torch.Tensor, cache_k: torch.Tensor,
                    cache_v: torch.Tensor) -> torch.Tensor | None:
    """(B, heads * hd): one token per sequence, q (B, heads, hd) rotated, attending over positions
    0..pos[b] of its sequence's blocks `tables` (B, width) in the pool cache_k, cache_v (blocks,
    kv heads, block_size, hd), which already holds the token's own key and value. In C, reading
    the blocks in place (the torch ops would gather every key and value of the batch first, per
    layer: at 32 rows of 300 positions that copy was most of a decode step). None when the C
    kernels are off or the tensors are not float32."""
    lib = native()
    if lib is None or q.dtype != torch.float32 or cache_k.dtype != torch.float32:
        return None
    B, h, hd = q.shape
    q, tables, pos = q.contiguous(), tables.contiguous(), pos.reshape(-1).contiguous()
    out = torch.empty(B, h * hd)
    if lib.qk_attend_paged(q.data_ptr(), B, h, cache_k.shape[1], hd, tables.data_ptr(), tables.shape[1], pos.data_ptr(),
                           cache_k.data_ptr(), cache_v.data_ptr(), cache_k.shape[2], out.data_ptr()):
        raise MemoryError("no memory for the attention's scratch")
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention on CPU as plain matrix products: torch's CPU flash kernel takes milliseconds per
    call for a one-token query (measured: 85% of a 110M decode step). Shapes as model.attention."""
    B, h, T, hd = q.shape
    kvh = k.shape[1]
    g = h // kvh
    qg = q.reshape(B, kvh, g * T, hd)  # query heads j*g .. j*g+g-1 share KV head j
    scores = torch.matmul(qg, k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))  # (B, kvh, g*T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask.repeat(1, 1, g, 1), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).type_as(q)
    return torch.matmul(probs, v).view(B, h, T, hd)


# ----------------------------------------------------------------------------- the C kernels
# The C kernels (qkernels.c) are compiled once per source, compiler, flags and CPU into the cache
# folder and loaded with ctypes; with no compiler, or LLAMA_DEMO_NATIVE_KERNELS=0, `native()` is
# None: float32 single rows go to OpenBLAS, decode steps to torch ops, and quant.py falls back to
# fbgemm (int8) or dequantizing products. A compiler that fails says so in one line (rank 0, at the
# first call: build_engine makes it at start-up), and native_failure() keeps it for the tests.

_SOURCE = Path(__file__).with_name("qkernels.c")
QK = 32  # the kernels' activation block: input sizes must be multiples of it
# -fopenmp links libgomp.so.1, which resolves to the copy torch already loaded: one thread pool.
# -march=native: this CPU's vector units (the AVX2 paths need avx2, fma and f16c); without it the
# portable loops only (what a CPU without AVX2 runs).
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-std=c11")
MARCH = ("-march=native",)
COST = "the C kernels are off: CPU decode runs 2-3x slower"  # float32 19.6 -> 44, int8 36 -> 116 tok/s (README)


class BuildError(RuntimeError):
    """The compiler refused qkernels.c (or its flags); the message is its first error line."""


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


@functools.cache
def compiler_identity(cc: str) -> str:
    """The first line of `cc --version` (part of the cache key: an upgraded compiler rebuilds)."""
    try:
        proc = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else ""


def first_error(output: str) -> str:
    """The line of a compiler's output that says what went wrong: the first naming an error (gcc and
    clang write `file:line:col: error: ...` or `gcc: error: ...`, after context lines such as
    `In function ...`), else the first line at all."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    line = next((x for x in lines if "error:" in x), lines[0] if lines else "")
    return line[:400]


def build(cc: str, out: Path, march: bool, source: Path = _SOURCE, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile `source` (qkernels.c) into `out` with FLAGS (+ MARCH, + extra_flags) and return
    `out`; raises BuildError with the compiler's first error line when it refuses."""
    flags = [*FLAGS, *(MARCH if march else ()), *extra_flags]
    tmp = Path(tempfile.mkstemp(dir=out.parent, suffix=".so")[1])
    try:
        proc = subprocess.run([cc, *flags, str(source), "-o", str(tmp), "-lm"], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            raise BuildError(first_error(proc.stderr + proc.stdout) or f"{cc} exited with status {proc.returncode}")
        os.replace(tmp, out)  # atomic: concurrent ranks each build, one file wins, all are whole
        return out
    except subprocess.TimeoutExpired:
        raise BuildError(f"{cc} took over 120 s") from None
    except OSError as e:  # no such compiler, no space for the output
        raise BuildError(f"{cc}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def cache_key(cc: str, march: bool, source: bytes) -> str:
    """What a build depends on: the source, the compiler (path and version), its flags, the CPU
    (for -march=native) and torch (whose libgomp the library links against)."""
    parts = [source, cc.encode(), compiler_identity(cc).encode(), " ".join(FLAGS + (MARCH if march else ())).encode(),
             _cpu_flags().encode(), torch.__version__.encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


@functools.cache
def native() -> ctypes.CDLL | None:
    """The C kernels' library for this CPU, compiled on first use; None when it cannot be."""
    return _load()[0]


def native_failure() -> str | None:
    """Why a compiler here could not give the C kernels (its first error line); None when they
    loaded, or were never to be built (LLAMA_DEMO_NATIVE_KERNELS=0, no compiler, not Linux)."""
    return _load()[1]


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("LLAMA_DEMO_NATIVE_KERNELS", "1") == "0" or sys.platform != "linux":
        return None, None
    cc = compiler()
    if not cc:
        return None, None
    source = _SOURCE.read_bytes()
    root = cache_root() / "kernels"
    errors = []
    for march in (True, False):  # a compiler that refuses -march=native may still build the portable loops
        lib_path = root / f"qkernels-{cache_key(cc, march, source)}.so"
        try:
            root.mkdir(parents=True, exist_ok=True)
            if not lib_path.is_file():
                build(cc, lib_path, march)
            lib = load_library(lib_path)
        except (BuildError, OSError) as e:  # OSError: an unwritable cache, a library that will not load
            errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
            continue
        if errors:
            _say(f"warning: qkernels.c built without -march=native ({cc}: {errors[0]}): the C kernels run "
                 "their portable loops, not this CPU's vector units")
        return lib, None
    _say(f"warning: {COST} ({cc} could not build qkernels.c: {errors[0]}); set CC to a working compiler, "
         "or LLAMA_DEMO_NATIVE_KERNELS=0 to run without them and without this line")
    return None, errors[0]


def _say(line: str) -> None:
    """One line on stderr, from rank 0 only (every rank builds, all would say the same)."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


def load_library(path: Path) -> ctypes.CDLL:
    """A build of qkernels.c, its functions' argument types declared."""
    lib = ctypes.CDLL(str(path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.qk_linear_q4.argtypes = [p, i64, p, p, p, i64, i64, i64, p]
    lib.qk_linear_q8.argtypes = [p, i64, p, p, i64, i64, p]
    lib.qk_linear_f32.argtypes = [p, i64, p, i64, i64, p]
    lib.qk_rmsnorm.argtypes = [p, p, p, i64, i64, ctypes.c_float, p]
    lib.qk_attend_decode.argtypes = [p, i64, i64, i64, i64, p, i64, p, p, p, p, i64, p]
    lib.qk_attend_paged.argtypes = [p, i64, i64, i64, i64, p, i64, p, p, p, i64, p]
    lib.qk_decode_attention.argtypes = [p, p, p, p, p]
    lib.qk_decode_ffn.argtypes = [p, p, p, p, p]
    lib.qk_decode_layers.argtypes = [p, p, i64, p, p]
    lib.qk_set_sgemm.argtypes = [p, i64]
    return lib


def native_f32_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for float32 x (..., cols) and w (rows, cols), read at memory speed for few rows of x."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty(x2.shape[0], w.shape[0])
    native().qk_linear_f32(x2.data_ptr(), x2.shape[0], w.data_ptr(), w.shape[0], w.shape[1], y.data_ptr())
    return y.view(*x.shape[:-1], w.shape[0])


def native_int8_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (w * scales[:, None]).T for int8 w (rows, cols), float32 scales, float32 x (..., cols)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty(x2.shape[0], w.shape[0])
    if native().qk_linear_q8(x2.data_ptr(), x2.shape[0], w.data_ptr(), scales.data_ptr(), w.shape[0], w.shape[1],
                             y.data_ptr()):
        raise MemoryError("no memory for the int8 kernel's scratch")
    return y.view(*x.shape[:-1], w.shape[0])


def native_int4_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       group_size: int) -> torch.Tensor:
    """x @ W.T for quant.py's int4 layout: w uint8 (rows, cols/2), float16 scales and zeros."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty(x2.shape[0], w.shape[0])
    if native().qk_linear_q4(x2.data_ptr(), x2.shape[0], w.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
                             w.shape[0], x2.shape[1], group_size, y.data_ptr()):
        raise MemoryError("no memory for the int4 kernel's scratch")
    return y.view(*x.shape[:-1], w.shape[0])


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


def fbgemm_int8_pack(q: torch.Tensor, scales: torch.Tensor):
    """fbgemm's packed weight for int8 rows q with per-row scales, for fbgemm_int8_linear.
    The one place that creates a quantized tensor: PyTorch marks that API deprecated; when it goes,
    this raises and quant.py falls back (its probe catches the error)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice: handled by the fallback above
        qt = torch._make_per_channel_quantized_tensor(q, scales.double(), torch.zeros(q.shape[0], dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qt, None)


def fbgemm_int8_linear(x: torch.Tensor, packed) -> torch.Tensor:
    """fbgemm's dynamic linear: activations quantized per call (per tensor, uint8), int8 GEMM."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    return torch.ops.quantized.linear_dynamic(x2, packed).view(*x.shape[:-1], -1)


# ----------------------------------------------------------------------------- decode steps in C
# native_decode.py runs a decode step's layers through qkernels.c (it says why); these describe the
# products to it.

class ProductSpec(ctypes.Structure):
    """One matrix product for the C decode step (qkernels.c's qk_product): kind 0 float32 weights
    (rows, cols); 1 int8 rows with float32 scales; 2 quant.py's int4 layout. Holds raw addresses:
    `tensors` keeps what they point into alive, and native_decode checks them before each step."""
    _fields_ = [("kind", ctypes.c_int64), ("w", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("zeros", ctypes.c_void_p), ("rows", ctypes.c_int64), ("cols", ctypes.c_int64),
                ("group", ctypes.c_int64)]

    @classmethod
    def _of(cls, kind: int, tensors: tuple[torch.Tensor, ...], rows: int, cols: int, group: int = 0):
        if not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors) or (kind and cols % QK):
            return None
        ptrs = [t.data_ptr() for t in tensors] + [None] * (3 - len(tensors))
        spec = cls(kind, *ptrs, rows, cols, group)
        spec.tensors = tensors
        return spec

    @classmethod
    def float32(cls, w: torch.Tensor) -> "ProductSpec | None":
        return cls._of(0, (w,), *w.shape) if w.dtype == torch.float32 and w.dim() == 2 else None

    @classmethod
    def int8(cls, w: torch.Tensor, scales: torch.Tensor) -> "ProductSpec | None":
        return cls._of(1, (w, scales), *w.shape) if scales.dtype == torch.float32 else None

    @classmethod
    def int4(cls, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> "ProductSpec | None":
        return cls._of(2, (w, scales, zeros), w.shape[0], w.shape[1] * 2, group)


class LayerSpec(ctypes.Structure):
    """One decode layer for the C decode step (qkernels.c's qk_layer): its four products, its two
    norms' weights and its KV cache, as addresses (native_decode's plan keeps the tensors)."""
    _fields_ = [("qkv", ctypes.POINTER(ProductSpec)), ("wo", ctypes.POINTER(ProductSpec)),
                ("w13", ctypes.POINTER(ProductSpec)), ("w2", ctypes.POINTER(ProductSpec)),
                ("attention_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p),
                ("cache_k", ctypes.c_void_p), ("cache_v", ctypes.c_void_p)]


class StepSpec(ctypes.Structure):
    """What every layer of one decode step shares (qkernels.c's qk_step)."""
    _fields_ = [("B", ctypes.c_int64), ("dim", ctypes.c_int64), ("heads", ctypes.c_int64),
                ("kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("block_size", ctypes.c_int64),
                ("table_width", ctypes.c_int64), ("tables", ctypes.c_void_p), ("pos", ctypes.c_void_p),
                ("rope", ctypes.c_void_p),
                ("eps", ctypes.c_float)]


def native_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """F.rms_norm(x) * weight over the last dimension; with `residual`, first residual += x (in
    place) and normalise the sum."""
    out = torch.empty_like(x)
    native().qk_rmsnorm(None if residual is None else residual.data_ptr(), x.data_ptr(), weight.data_ptr(),
                        x.numel() // x.shape[-1], x.shape[-1], eps, out.data_ptr())
    return out
