"""Building qkernels.c (model/cpu_kernels.py): a compiler that fails says why in one line and fails
the suite instead of skipping it; the cache key follows flags and compiler; without the C kernels
(LLAMA_DEMO_NATIVE_KERNELS=0) generation takes the torch ops and gives the same greedy tokens; a
kernel that cannot have its scratch memory says so instead of leaving its output unwritten."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import NATIVE, ROOT, make_checkpoint, subprocess_env
from llama_demo.model import cpu_kernels

CC = cpu_kernels.compiler()
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler here")


@needs_cc
def test_broken_source_or_refused_flag_is_one_line_from_the_compiler(tmp_path):
    broken = tmp_path / "qkernels.c"
    broken.write_text(cpu_kernels._SOURCE.read_text().replace("#define ROW_RUN 16", "#define ROW_RUN 16\nint oops(", 1))
    with pytest.raises(cpu_kernels.BuildError) as e:
        cpu_kernels.build(CC, tmp_path / "broken.so", march=True, source=broken)
    assert "qkernels.c:" in str(e.value) and "error:" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(cpu_kernels.BuildError) as e:
        cpu_kernels.build(CC, tmp_path / "flag.so", march=False, extra_flags=("-mno-such-flag-anywhere",))
    assert "-mno-such-flag-anywhere" in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.glob("*.so"))  # nothing half-built is left for a later load


def test_cache_key_follows_the_flags_and_the_compiler(monkeypatch):
    src = cpu_kernels._SOURCE.read_bytes()
    key = cpu_kernels.cache_key("cc", True, src)
    assert key != cpu_kernels.cache_key("cc", False, src)  # -march=native or not
    monkeypatch.setattr(cpu_kernels, "FLAGS", cpu_kernels.FLAGS + ("-ffast-math",))
    assert cpu_kernels.cache_key("cc", True, src) != key
    monkeypatch.undo()
    monkeypatch.setattr(cpu_kernels, "compiler_identity", lambda cc: "cc (an upgrade) 99.0")
    assert cpu_kernels.cache_key("cc", True, src) != key


@needs_cc
def test_a_failing_compiler_is_one_line_at_start_up_and_fails_the_suite(tmp_path):
    """A compiler that refuses a flag (as Apple's clang refuses -fopenmp): one warning line with its
    error and the cost, and the C kernel tests fail with it rather than skip."""
    cc = tmp_path / "cc"
    cc.write_text(f'#!/bin/sh\nexec {CC} "$@" -mno-such-flag-anywhere\n')
    cc.chmod(0o755)
    env = dict(subprocess_env(), CC=str(cc), LLAMA_DEMO_CACHE=str(tmp_path / "cache"))
    code = "from llama_demo.model import cpu_kernels; print(cpu_kernels.native(), cpu_kernels.native_failure())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "C kernels are off" in lines[0] and "2-3x slower" in lines[0] and "-mno-such-flag-anywhere" in lines[0]
    assert proc.stdout.startswith("None ") and "-mno-such-flag-anywhere" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_native_build.py::test_the_c_kernels_load"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "1 error" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-3000:]
    assert "qkernels.c did not build: " in proc.stdout and "-mno-such-flag-anywhere" in proc.stdout
    # a compiler refusing only -march=native: the portable loops, and one line saying so
    cc.write_text(f'#!/bin/sh\ncase "$*" in *-march=native*) echo "cc: error: no -march=native here" >&2; exit 1;; esac\n'
                  f'exec {CC} "$@"\n')
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 0 and proc.stdout.endswith(" None\n") and not proc.stdout.startswith("None ")
    assert len(lines) == 1 and "without -march=native" in lines[0] and "no -march=native here" in lines[0], proc.stderr


@NATIVE
def test_the_c_kernels_load():
    """Here, where a compiler exists: the library builds (or the run fails, see above)."""
    assert cpu_kernels.native() is not None and cpu_kernels.native_failure() is None


def _greedy(ckpt, native: str) -> list[list[int]]:
    cmd = [sys.executable, "-m", "llama_demo.generate", "--ckpt_dir", str(ckpt), "--prompt", "The quick brown fox",
           "--prompt", "Once upon a time there", "--max_new_tokens", "12", "--temperature", "0", "--max_seq_len", "64",
           "--max_batch_size", "2", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(subprocess_env(), LLAMA_DEMO_NATIVE_KERNELS=native),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line)["tokens"] for line in proc.stdout.splitlines() if line.startswith("{")]


def test_without_the_c_kernels_generation_gives_the_same_greedy_tokens(tmp_path):
    """LLAMA_DEMO_NATIVE_KERNELS=0 (the path of a machine with no compiler): OpenBLAS single rows,
    torch decode steps; the same float32 model gives the same greedy tokens as with the C kernels."""
    ckpt = make_checkpoint(tmp_path / "gqa", "gqa", seed=8)
    off = _greedy(ckpt, "0")
    assert len(off) == 2 and all(len(t) == 12 for t in off)
    if cpu_kernels.native() is not None:
        assert _greedy(ckpt, "1") == off


@needs_cc
def test_int4_product_reports_scratch_it_could_not_have(tmp_path):
    """qk_mm_q4's per-thread scratch (group sizes other than 32 on AVX2, every group on the portable
    loops): when malloc refuses it, qk_linear_q4 returns nonzero (native_int4_linear raises
    MemoryError) instead of 0 with the output never written. A test build whose malloc refuses
    exactly that size."""
    from llama_demo.model.quant import quantize_int4_rtn

    cols, group = 384, 64
    header = tmp_path / "failing_malloc.h"
    header.write_text("#include <stdlib.h>\n"
                      f"static void *failing_malloc(size_t n) {{ return n == {6 * cols // 32 * 4} ? NULL : malloc(n); }}\n"
                      "#define malloc failing_malloc\n")
    lib = cpu_kernels.load_library(cpu_kernels.build(CC, tmp_path / "failing.so", march=True,
                                                     extra_flags=("-include", str(header))))
    packed, scales, zeros = quantize_int4_rtn(torch.randn(24, cols, generator=torch.Generator().manual_seed(3)), group)
    x, y = torch.randn(1, cols), torch.zeros(1, 24)
    assert lib.qk_linear_q4(x.data_ptr(), 1, packed.data_ptr(), scales.data_ptr(), zeros.data_ptr(), 24, cols, group,
                            y.data_ptr()) != 0
