"""llama.cpp as a peer in `bench --weights`: the same model's GGUF in f32, q8_0 and q4_0, measured
in the same run and the same way (best of rounds; batch-1 and n-request decode, time to first
token, weight bytes, perplexity of the same token ids). Optional: it runs when llama-cpp-python is importable
(a ~10-minute build: `pip install llama-cpp-python`), never in CI.

The three files are made once from the model's GGUF by llama.cpp's own quantizer into the bench
cache (from a quantized source with `allow_requantize`: dequantized to f32 first, then q8_0 and
q4_0 from that f32 file, so all three hold what our float32 model holds).
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import sys
import math
import time
from pathlib import Path

import numpy as np

TYPES = ("f32", "q8_0", "q4_0")


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def variants(source: Path, cache: Path) -> list[tuple[str, Path]]:
    """[(label, path)] of the source GGUF as f32, q8_0 and q4_0, made on first use."""
    import llama_cpp

    ftypes = {"f32": llama_cpp.LLAMA_FTYPE_ALL_F32, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
              "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for kind in TYPES:
        path = cache / f"{source.stem}.{kind}.gguf"
        if not path.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.allow_requantize = ftypes[kind], True
            src = source if kind == "f32" else cache / f"{source.stem}.f32.gguf"
            tmp = path.with_suffix(".tmp")
            with _quiet_stderr():  # its quantizer prints a line per tensor from C
                failed = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
            if failed:
                raise RuntimeError(f"llama.cpp could not write {kind} from {src}")
            tmp.rename(path)
        out.append((f"llama.cpp {kind}", path))
    return out


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for a while: C code's prints do not go through sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Peer:
    """One GGUF loaded in llama.cpp with `threads` threads, measured as bench_engine measures ours."""

    def __init__(self, label: str, path: Path, threads: int, n_ctx: int):
        import llama_cpp

        self.label, self.path, self.threads = label, path, threads
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=512, verbose=False)
        self._model = None  # the C API's handle, for batched_rate

    def figures(self, prompt: list[int], new_tokens: int) -> dict:
        """Time to first token (prefill + one token) and batch-1 decode tokens/s (greedy)."""
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return {"ttft_s": ttft, "decode_tok_s_c1": (new_tokens - 1) / (time.perf_counter() - t0)}

    def batched_rate(self, prompts: list[list[int]], new_tokens: int) -> float:
        """Aggregate greedy decode tokens/s of len(prompts) sequences run together, as llama.cpp's
        server runs parallel slots: one context with a KV sequence each, one llama_decode a step
        holding a token of every sequence (the high-level binding has one sequence only, so this
        uses the C API). Timed from the step after the prompts' prefill to the last token, as ours."""
        import llama_cpp as L

        n, longest = len(prompts), max(len(p) for p in prompts)
        with _quiet_stderr():  # the C API logs every context it makes
            if self._model is None:  # a second handle on the same file (mmap: the pages are shared)
                self._model = L.llama_model_load_from_file(str(self.path).encode(), L.llama_model_default_params())
                if not self._model:
                    raise RuntimeError(f"llama.cpp could not load {self.path}")
            cp = L.llama_context_default_params()
            cp.n_ctx, cp.n_seq_max = n * (longest + new_tokens), n
            cp.n_batch = max(512, sum(len(p) for p in prompts))
            cp.n_threads = cp.n_threads_batch = self.threads
            ctx = L.llama_init_from_model(self._model, cp)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {n} sequences")
        batch = L.llama_batch_init(cp.n_batch, 0, n)
        vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self._model))
        try:
            def decode(entries: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, wants logits)
                for i, (token, pos, seq, logits) in enumerate(entries):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
                    batch.seq_id[i][0] = seq
                batch.n_tokens = len(entries)
                if L.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")

            def greedy(index: int) -> int:  # the argmax of the batch entry's logits
                return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, index), shape=(vocab,)).argmax())

            decode([(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)])
            ends = np.cumsum([len(p) for p in prompts]) - 1
            last = [greedy(int(e)) for e in ends]
            t0 = time.perf_counter()
            for step in range(new_tokens - 1):
                decode([(last[s], len(p) + step, s, True) for s, p in enumerate(prompts)])
                last = [greedy(s) for s in range(n)]
            return n * (new_tokens - 1) / (time.perf_counter() - t0)
        finally:
            L.llama_batch_free(batch)
            L.llama_free(ctx)

    def perplexity(self, ids: list[int]) -> float:
        """exp(mean NLL) of ids[1:] given what precedes each, one window, as eval.perplexity."""
        import llama_cpp

        # a second instance: logits for every position (logits_all) and a context as long as the
        # text, which the speed runs should not carry
        llm = llama_cpp.Llama(str(self.path), n_ctx=len(ids), n_threads=self.threads, n_batch=512,
                              logits_all=True, verbose=False)
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        nll = log_z - logits[np.arange(len(ids) - 1), ids[1:]]
        del llm
        return math.exp(nll.mean())
