"""bench --weights: several precisions of one model side by side in one process (float32, int8
and int4 quantized at load, or `label=folder` for a checkpoint written by llama_demo.quantize),
measured in turns, round after round, so that a noisy machine disturbs them alike; beside each:
its weight memory and, for a checkpoint with a tokenizer, its perplexity on --text; and
llama.cpp's f32 / q8_0 / q4_0 of the same model's GGUF when llama-cpp-python is installed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..config import cache_root
from ..engine.engine import Engine
from ..model.parallel import cpu_threads, init_distributed, parse_dtype
from ..model.quant import weight_bytes, weights_label
from ..text.tokenizer import find_tokenizer, load_tokenizer
from ..weights.loading import load_model
from .bench_measure import NoTextTokenizer, bench_engine, random_checkpoint
from .eval import perplexity


def parse_weights(spec: str) -> list[tuple[str, str | None, str | None]]:
    """"float32,int8,int4,gptq=DIR" -> [(label, quantize at load, folder or None for --ckpt_dir)]."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        label, _, folder = item.partition("=")
        if folder:
            out.append((label, None, folder))
        elif label in ("float32", "int8", "int4"):
            out.append((label, None if label == "float32" else label, None))
        else:
            raise ValueError(f"--weights: {item!r} is not float32, int8, int4 or label=folder")
    if not out:
        raise ValueError("--weights needs at least one entry")
    return out


def bench_weights(a: argparse.Namespace, conc: list[int], weights: list[tuple[str, str | None, str | None]]) -> int:
    """Several precisions of one model side by side: loaded together, measured in turns."""
    info = init_distributed(device=a.device)
    if info.world_size != 1:
        raise ValueError("--weights runs on one rank")
    base = Path(a.ckpt_dir) if a.ckpt_dir else random_checkpoint(a.shape)
    ids = None
    if a.ckpt_dir and a.ppl_tokens > 0:
        ids = load_tokenizer(find_tokenizer(base, None)).encode(Path(a.text).read_text(encoding="utf-8"), bos=False)
        ids = ids[: a.ppl_tokens]
    max_len = a.prompt_len + a.new_tokens + 8
    runs = []
    for label, quantize, folder in weights:
        model = load_model(folder or base, info, parse_dtype(a.dtype), max(max_len, len(ids or [])), 1, progress=False,
                           quantize=quantize)
        held, _ = weight_bytes(model)
        held += sum(p.packed.numel() * p.packed.element_size() for p in model.products()
                    if getattr(p, "packed", None) is not None)  # oneDNN's blocked copies (pack_for_cpu)
        row = {"label": label, "dtype": weights_label(model), "weight_mb": held / 2**20}
        if ids:
            row["perplexity"] = perplexity(model, ids, len(ids), info.device)
        print(f"{label}: loaded ({row['dtype']}, {row['weight_mb']:.1f} MB)"
              + (f", perplexity {row['perplexity']:.3f}" if ids else ""), file=sys.stderr, flush=True)
        model.setup_cache(max(conc), max_len, info.device, model.norm.weight.dtype)  # the benchmark's cache, not the text's
        engine = Engine(model, NoTextTokenizer(), info.rank, info.world_size, info.device, seed=0)
        runs.append((engine, row))
    gguf = _peer_gguf(a, base) if info.device.type == "cpu" else None
    if gguf:
        from . import bench_llama_cpp

        for label, path in bench_llama_cpp.variants(gguf, cache_root() / "bench" / "llama.cpp"):
            peer = bench_llama_cpp.Peer(label, path, cpu_threads(), max_len)
            row = {"label": label, "dtype": "gguf " + label.split()[-1], "weight_mb": path.stat().st_size / 2**20}
            if ids:
                row["perplexity"] = peer.perplexity(ids)
            print(f"{label}: loaded ({row['weight_mb']:.1f} MB)" + (f", perplexity {row['perplexity']:.3f}" if ids else ""),
                  file=sys.stderr, flush=True)
            runs.append((peer, row))
    g = torch.Generator().manual_seed(1)
    for _ in range(a.repeats):  # rounds of one run each, so every precision meets the same disturbances
        for runner, row in runs:
            if isinstance(runner, Engine):
                figures = bench_engine(runner, a.prompt_len, a.new_tokens, conc, repeats=1)
            else:  # llama.cpp: batch 1, then n sequences in one context
                vocab = runs[0][0].model.args.vocab_size

                def prompt() -> list[int]:
                    return torch.randint(3, vocab, (a.prompt_len,), generator=g).tolist()
                figures = runner.figures(prompt(), a.new_tokens)
                for n in conc:
                    if n > 1:
                        figures[f"decode_tok_s_c{n}"] = runner.batched_rate([prompt() for _ in range(n)], a.new_tokens)
            for key, value in figures.items():
                row.setdefault(key, []).append(value)
    rows = []
    for _, row in runs:
        out = dict(row)
        for key in ("ttft_s", *(f"decode_tok_s_c{n}" for n in conc)):
            vals = row.get(key)
            if not vals:
                continue
            best = min(vals) if key == "ttft_s" else max(vals)
            out[key], out[key + "_range"] = best, [min(vals), max(vals)]
        out.pop("peak_mem_mb", None)
        rows.append(out)
    result = {"model": str(base), "ranks": 1, "device": str(info.device), "threads": cpu_threads(),
              "repeats": a.repeats, "weights": rows}
    if a.json:
        print(json.dumps(result))
    else:
        print_weights(result, conc)
    return 0


def default_gguf(ckpt_dir: str) -> Path | None:
    """The default model's own GGUF when ckpt_dir is the default model (what it was made from)."""
    from ..weights.convert import ConvertError
    from ..weights.default_model import default_model_dir, find_default_gguf

    try:
        if Path(ckpt_dir).resolve() == default_model_dir().resolve():
            return find_default_gguf()
    except ConvertError:
        pass
    return None


def _peer_gguf(a: argparse.Namespace, base: Path) -> Path | None:
    """The GGUF llama.cpp runs beside us: --gguf, else the default model's own when --ckpt_dir is
    the default model; None when llama-cpp-python is not installed or --no-llama-cpp."""
    from . import bench_llama_cpp

    if not a.llama_cpp or not bench_llama_cpp.available():
        return None
    if a.gguf:
        return Path(a.gguf)
    return default_gguf(a.ckpt_dir) if a.ckpt_dir else None


def print_weights(r: dict, conc: list[int]) -> None:
    rows = r["weights"]
    print(f"model {r['model']}  device {r['device']}  threads {r['threads']}  best of {r['repeats']} rounds "
          f"(range in brackets)")
    print(f"{'':24}" + "".join(f"{w['label']:>20}" for w in rows))
    print(f"{'weights':24}" + "".join(f"{w['dtype']:>20}" for w in rows))

    def line(name: str, key: str, fmt: str) -> None:
        cells = []
        for w in rows:
            if key not in w:  # not measured for this one
                cells.append("-")
                continue
            lo, hi = w[key + "_range"]
            cells.append(f"{format(w[key], fmt)} [{format(lo, fmt)}-{format(hi, fmt)}]")
        print(f"{name:24}" + "".join(f"{c:>20}" for c in cells))

    line("time to first token s", "ttft_s", ".3f")
    for n in conc:
        line(f"decode tok/s, {n} req", f"decode_tok_s_c{n}", ".1f")
    first = rows[0]
    for n in conc:
        key = f"decode_tok_s_c{n}"
        print(f"{'  vs ' + first['label'] + f', {n} req':24}"
              + "".join(f"{w[key] / first[key]:>19.2f}x" if key in w else f"{'-':>20}" for w in rows))
    print(f"{'weight memory MB':24}" + "".join(f"{w['weight_mb']:>20.1f}" for w in rows))
    if all("perplexity" in w for w in rows):
        print(f"{'perplexity':24}" + "".join(f"{w['perplexity']:>20.3f}" for w in rows))
        print(f"{'  vs ' + first['label']:24}" + "".join(f"{100 * (w['perplexity'] / first['perplexity'] - 1):>+19.2f}%" for w in rows))
