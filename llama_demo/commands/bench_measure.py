"""The measurements every bench mode shares: a named shape's random checkpoint, the engine's
figures (time to first token, decode rates under continuous batching, peak memory) and
transformers' `generate` measured the same way.
"""
from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import torch

from ..config import NAMED_SHAPES, ModelArgs, cache_root
from ..engine.engine import Engine, Request
from ..engine.sampler import SamplingParams
from ..model.parallel import synchronize
from ..weights.checkpoint import expected_shapes, save_sharded


class NoTextTokenizer:
    """The engine only needs stop ids and a decoder; benchmarks measure tokens, not text."""
    stop_ids: frozenset = frozenset()
    special_ids: frozenset = frozenset()
    vocab_size = 0

    def decode(self, ids) -> str:
        return ""


def random_checkpoint(shape: str, cache: Path | None = None) -> Path:
    if shape not in NAMED_SHAPES:
        raise ValueError(f"--shape must be one of {', '.join(NAMED_SHAPES)}")
    cache = cache or cache_root() / "bench"
    folder = cache / f"random-{shape}"
    if (folder / "params.json").is_file():
        return folder
    args = ModelArgs(**NAMED_SHAPES[shape])
    g = torch.Generator().manual_seed(0)
    state = {n: (torch.randn(s, generator=g) * 0.02 if len(s) == 2 else torch.ones(s))
             for n, s in expected_shapes(args).items()}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache))  # written aside, renamed when complete
    save_sharded(state, args, tmp, 1)
    tmp.rename(folder)
    return folder


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench_engine(engine: Engine, prompt_len: int, new_tokens: int, concurrency: list[int], repeats: int = 3) -> dict:
    """Best of `repeats` runs of each figure: these machines are noisy, and the best run is the
    one least disturbed by other processes (the same rule is applied to the peers)."""
    vocab = engine.model.args.vocab_size
    g = torch.Generator().manual_seed(1)

    def prompt() -> list[int]:
        return torch.randint(3, vocab, (prompt_len,), generator=g).tolist()

    greedy = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    engine.generate([Request("warm", prompt(), SamplingParams(temperature=0.0, max_new_tokens=4))])

    def ttft() -> float:  # prefill + one sampled token
        synchronize(engine.device)
        t0 = time.perf_counter()
        engine.generate([Request("ttft", prompt(), SamplingParams(temperature=0.0, max_new_tokens=1))])
        synchronize(engine.device)
        return time.perf_counter() - t0

    def decode_rate(n: int) -> float:
        """Aggregate decode tokens/s while all n requests run together: from the step after the
        last prompt was prefilled to the step in which the first request finishes."""
        for i in range(n):
            engine.add(Request(f"c{n}-{i}", prompt(), greedy))
        started: set = set()
        t0 = t1 = None
        tokens = 0
        while not engine.idle:
            events = engine.step()
            if t0 is not None and t1 is None:
                tokens += sum(1 for e in events if e.token_id is not None)
                if any(e.finished for e in events):
                    synchronize(engine.device)
                    t1 = time.perf_counter()
            started.update(e.request_id for e in events if e.token_id is not None)
            if t0 is None and len(started) == n:  # every prompt prefilled: decoding from here on
                synchronize(engine.device)
                t0 = time.perf_counter()
        return tokens / ((t1 or time.perf_counter()) - t0)

    out = {"ttft_s": min(ttft() for _ in range(repeats))}
    for n in concurrency:
        out[f"decode_tok_s_c{n}"] = max(decode_rate(n) for _ in range(repeats))
    out["peak_mem_mb"] = peak_memory_mb(engine.device)
    return out


def bench_hf(model, prompt_len: int, new_tokens: int, device: torch.device, concurrency: list[int],
             repeats: int = 3) -> dict:
    """transformers `generate`, greedy: time to first token, and for each n the decode rate of a
    static batch of n equal-length prompts (its best case: no padding, all finish together)."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (1, prompt_len), generator=g).to(device)

    def gen(n_tokens: int, batch: int = 1) -> float:
        synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids.repeat(batch, 1), max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                           pad_token_id=0)
        synchronize(device)
        return time.perf_counter() - t0

    gen(2)
    out = {"ttft_s": min(gen(1) for _ in range(repeats))}
    for n in concurrency:
        first = out["ttft_s"] if n == 1 else min(gen(1, n) for _ in range(repeats))
        total = min(gen(new_tokens, n) for _ in range(repeats))
        out[f"decode_tok_s_c{n}"] = n * (new_tokens - 1) / max(total - first, 1e-9)
    return out
