"""Speed and memory of the engine, with Hugging Face transformers side by side in the same run.

    python -m llama_demo.bench --shape 110M --vs-hf
    torchrun --nproc_per_node 2 -m llama_demo.bench --shape 110M
    python -m llama_demo.bench --ckpt_dir models/7B --dtype bfloat16
    python -m llama_demo.bench --ckpt_dir DIR --weights float32,int8,int4,gptq=QUANTIZED_DIR

Reports time to first token, batch-1 decode tokens/s, aggregate tokens/s with 1, 4 and 16
concurrent requests (continuous batching), and peak memory. A named shape gets random weights,
written once as a Meta checkpoint into the cache so that every peer reads the same weights.
`--weights` loads several precisions of the same model side by side in one process (float32, int8
and int4 quantized at load, or `label=folder` for a checkpoint written by llama_demo.quantize) and
measures them in turns, round after round, so that a noisy machine disturbs them alike; beside
each: its weight memory and, for a checkpoint with a tokenizer, its perplexity on --text.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..weights.checkpoint import expected_shapes, open_checkpoint, save_sharded
from ..config import NAMED_SHAPES, ModelArgs, cache_root
from ..model.parallel import cpu_threads, init_distributed, parse_dtype
from ..engine.engine import Engine, Request
from .startup import add_quantize_arg, run_command
from ..weights.loading import load_model
from ..model.quant import weights_label
from ..engine.sampler import SamplingParams


class _NoTextTokenizer:
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        _sync(engine.device)
        t0 = time.perf_counter()
        engine.generate([Request("ttft", prompt(), SamplingParams(temperature=0.0, max_new_tokens=1))])
        _sync(engine.device)
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
                    _sync(engine.device)
                    t1 = time.perf_counter()
            started.update(e.request_id for e in events if e.token_id is not None)
            if t0 is None and len(started) == n:  # every prompt prefilled: decoding from here on
                _sync(engine.device)
                t0 = time.perf_counter()
        return tokens / ((t1 or time.perf_counter()) - t0)

    out = {"ttft_s": min(ttft() for _ in range(repeats))}
    for n in concurrency:
        out[f"decode_tok_s_c{n}"] = max(decode_rate(n) for _ in range(repeats))
    out["peak_mem_mb"] = peak_memory_mb(engine.device)
    return out


def hf_model_from_meta(folder: Path, dtype: torch.dtype, device: torch.device):
    """transformers' LlamaForCausalLM on a one-rank view of a Meta checkpoint (rotary rows permuted)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..weights.hf import hf_from_meta_rotary as permute, hf_name

    ck = open_checkpoint(folder, 1)
    a = ck.args
    # Llama 3.1's scaled rotary frequencies (use_scaled_rope) are transformers' rope_type "llama3"
    rope = {"rope_type": "default", "rope_theta": a.rope_theta}
    if a.rope_scaling is not None:
        rope = {**rope, "rope_type": "llama3", **a.rope_scaling}
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_hidden,
                      num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                      rms_norm_eps=a.norm_eps, rope_parameters=rope, max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    sd = {}
    for name in ck.full_shapes:
        t = ck.rank_slice(name, 0, 1).to(dtype)
        if name.endswith("attention.wq.weight"):
            t = permute(t, a.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = permute(t, a.n_kv_heads)
        sd[hf_name(name)] = t
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model.eval()


def bench_hf(model, prompt_len: int, new_tokens: int, device: torch.device, concurrency: list[int],
             repeats: int = 3) -> dict:
    """transformers `generate`, greedy: time to first token, and for each n the decode rate of a
    static batch of n equal-length prompts (its best case: no padding, all finish together)."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (1, prompt_len), generator=g).to(device)

    def gen(n_tokens: int, batch: int = 1) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids.repeat(batch, 1), max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                           pad_token_id=0)
        _sync(device)
        return time.perf_counter() - t0

    gen(2)
    out = {"ttft_s": min(gen(1) for _ in range(repeats))}
    for n in concurrency:
        first = out["ttft_s"] if n == 1 else min(gen(1, n) for _ in range(repeats))
        total = min(gen(new_tokens, n) for _ in range(repeats))
        out[f"decode_tok_s_c{n}"] = n * (new_tokens - 1) / max(total - first, 1e-9)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_demo.bench", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt_dir", help="a Meta-layout checkpoint folder")
    src.add_argument("--shape", help=f"random weights of a named shape: {', '.join(NAMED_SHAPES)}")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    add_quantize_arg(p)
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated request counts")
    p.add_argument("--vs-hf", dest="vs_hf", action="store_true", help="run transformers generate in the same run")
    p.add_argument("--repeats", type=int, default=3, help="best of N runs per figure")
    p.add_argument("--ranks", default=None, help="e.g. 1,2: run under torchrun with each rank count, side by side")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--weights", default=None,
                   help="e.g. float32,int8,int4[,label=quantized_dir]: measure these side by side (one rank)")
    p.add_argument("--text", default="assets/pride_and_prejudice.txt", help="perplexity text for --weights")
    p.add_argument("--ppl_tokens", type=int, default=2048, help="first N tokens of --text, one window (0: no perplexity)")
    p.add_argument("--gguf", default=None,
                   help="with --weights: this model's GGUF, measured in llama.cpp as f32 / q8_0 / q4_0 beside ours when "
                        "llama-cpp-python is installed (default: the default model's own GGUF when --ckpt_dir is it)")
    p.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false", help="with --weights: leave llama.cpp out")
    p.add_argument("--scenario", choices=["chat", "serve"], default=None,
                   help="chat: a multi-turn conversation's time to first token with prefix reuse on and off, "
                        "conversations sharing a long system prompt, 32 chats at once in the KV memory of 8 x 2048 "
                        "positions, and running decodes' rate while a long prompt is prefilled (needs --ckpt_dir of "
                        "a chat model); "
                        "serve: the HTTP server under streamed clients (--concurrency, --rates) beside llama-server")
    p.add_argument("--rates", default="", help="with --scenario serve: comma-separated request rates (requests/s)")
    p.add_argument("--requests", type=int, default=32, help="with --scenario serve: requests per load")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="with --scenario serve: threads of each server")
    p.add_argument("--llama_server", default=None,
                   help="with --scenario serve: llama.cpp's llama-server binary (default: $LLAMA_SERVER, then PATH)")
    p.add_argument("--server_args", default="", help="with --scenario serve: extra app.py flags, space-separated")
    a = p.parse_args(argv)
    conc = [int(c) for c in a.concurrency.split(",")]
    if a.new_tokens < 2 or a.prompt_len < 1 or min(conc) < 1:
        p.error("--new_tokens must be >= 2, --prompt_len and every --concurrency >= 1")
    if a.scenario == "serve":
        if not a.ckpt_dir or a.ranks:
            p.error("--scenario serve starts app.py on one rank: give --ckpt_dir")
        return run_command(lambda: _bench_serve(a, conc))
    if a.scenario == "chat":
        if not a.ckpt_dir or a.ranks or a.weights:
            p.error("--scenario chat runs a chat model's folder (--ckpt_dir) on this process's ranks")
        from .bench_serving import bench_chat

        return run_command(lambda: bench_chat(a))
    if a.weights:
        if a.ranks or a.quantize or a.vs_hf:
            p.error("--weights compares precisions on one rank: drop --ranks, --quantize and --vs-hf")
        try:
            weights = parse_weights(a.weights)
        except ValueError as e:
            p.error(str(e))
        return run_command(lambda: _bench_weights(a, conc, weights))
    if a.ranks:
        return compare_rank_counts(argv if argv is not None else sys.argv[1:], [int(r) for r in a.ranks.split(",")], conc)
    return run_command(lambda: _bench(a, conc))


def _bench(a: argparse.Namespace, conc: list[int]) -> int:
    info = init_distributed(device=a.device)
    folder = Path(a.ckpt_dir) if a.ckpt_dir else None
    if folder is None:
        # rank 0 writes the random checkpoint once; the others wait for it
        if info.rank == 0:
            folder = random_checkpoint(a.shape)
        if info.world_size > 1:
            torch.distributed.barrier()
        folder = folder or random_checkpoint(a.shape)
    max_len = a.prompt_len + a.new_tokens + 8
    model = load_model(folder, info, parse_dtype(a.dtype), max_len, max(conc), progress=False, quantize=a.quantize)
    engine = Engine(model, _NoTextTokenizer(), info.rank, info.world_size, info.device, seed=0)
    ours = bench_engine(engine, a.prompt_len, a.new_tokens, conc, a.repeats)
    result = {"model": a.shape or str(folder), "ranks": info.world_size, "device": str(info.device),
              "dtype": weights_label(model), "threads": cpu_threads() if info.device.type == "cpu" else 0,
              "llama_demo": ours}
    if a.vs_hf and info.rank == 0:
        del engine, model
        # transformers runs on torch's own thread pool: give it this rank's cores, as it has by default
        torch.set_num_threads(cpu_threads())
        hf = hf_model_from_meta(folder, parse_dtype(a.dtype) or (torch.float32 if info.device.type == "cpu" else torch.bfloat16), info.device)
        result["transformers"] = bench_hf(hf, a.prompt_len, a.new_tokens, info.device, conc, a.repeats)
    if info.rank == 0:
        if a.json:
            print(json.dumps(result))
        else:
            _print(result, conc)
    return 0


def _bench_serve(a: argparse.Namespace, conc: list[int]) -> int:
    from . import bench_http

    server = bench_http.find_llama_server(a.llama_server)
    gguf = Path(a.gguf) if a.gguf else _default_gguf(a.ckpt_dir) if server else None
    if server and gguf is None:
        print("no GGUF for llama-server (--gguf): measuring llama_demo alone", flush=True)
    if server is None:
        print("llama-server not found (--llama_server, $LLAMA_SERVER or PATH): measuring llama_demo alone", flush=True)
    weights = [w for w, _, _ in parse_weights(a.weights)] if a.weights else ["float32"]
    text = a.text if a.text != "assets/pride_and_prejudice.txt" else str(Path(__file__).resolve().parents[2] / a.text)
    rows = bench_http.serve_scenario(a.ckpt_dir, weights, conc, [float(r) for r in a.rates.split(",") if r],
                                     a.requests, a.new_tokens, text, a.threads, server, gguf, a.server_args.split(),
                                     cache_root() / "bench" / "llama.cpp", cache_root() / "bench" / "serve-logs")
    bench_http.print_ratios(rows)
    if a.json:
        print(json.dumps(rows))
    return 0


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


def _bench_weights(a: argparse.Namespace, conc: list[int], weights: list[tuple[str, str | None, str | None]]) -> int:
    """Several precisions of one model side by side: loaded together, measured in turns."""
    from ..model.quant import weight_bytes
    from .eval import perplexity

    info = init_distributed(device=a.device)
    if info.world_size != 1:
        raise ValueError("--weights runs on one rank")
    base = Path(a.ckpt_dir) if a.ckpt_dir else random_checkpoint(a.shape)
    ids = None
    if a.ckpt_dir and a.ppl_tokens > 0:
        from ..text.tokenizer import load_tokenizer
        from .startup import find_tokenizer

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
        engine = Engine(model, _NoTextTokenizer(), info.rank, info.world_size, info.device, seed=0)
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
        _print_weights(result, conc)
    return 0


def _default_gguf(ckpt_dir: str) -> Path | None:
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
    return _default_gguf(a.ckpt_dir) if a.ckpt_dir else None


def _print_weights(r: dict, conc: list[int]) -> None:
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


def compare_rank_counts(argv: list[str], ranks: list[int], conc: list[int]) -> int:
    """Run this benchmark under torchrun once per rank count and print the runs side by side."""
    import subprocess

    from ..model.parallel import free_port

    base, skip = [], False
    for x in argv:  # drop --ranks (both spellings), and --vs-hf beyond the first run
        if skip:
            skip = False
        elif x == "--ranks":
            skip = True
        elif not x.startswith("--ranks="):
            base.append(x)
    results = []
    for i, n in enumerate(ranks):
        args = [x for x in base if i == 0 or x != "--vs-hf"] + ["--json"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "llama_demo.bench", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    _print(results[0], conc)
    first = results[0]["llama_demo"]
    for r in results[1:]:
        o = r["llama_demo"]
        print(f"\n{r['ranks']} ranks ({r['threads']} thread(s) each), vs {results[0]['ranks']} rank(s):")
        for n in conc:
            key = f"decode_tok_s_c{n}"
            print(f"{f'decode tok/s, {n} req':24}{o[key]:12.1f}{o[key] / first[key]:8.2f}x")
    return 0


def _print(r: dict, conc: list[int]) -> None:
    o = r["llama_demo"]
    print(f"model {r['model']}  ranks {r['ranks']}  device {r['device']}  dtype {r['dtype']}  threads/rank {r['threads']}")
    print(f"{'':24}{'llama_demo':>12}" + (f"{'transformers':>14}{'ratio':>8}" if "transformers" in r else ""))
    hf = r.get("transformers", {})
    print(f"{'time to first token s':24}{o['ttft_s']:12.3f}" + (f"{hf['ttft_s']:14.3f}{hf['ttft_s'] / o['ttft_s']:8.2f}" if hf else ""))
    for n in conc:
        line = f"{f'decode tok/s, {n} req':24}{o[f'decode_tok_s_c{n}']:12.1f}"
        if hf:
            line += f"{hf[f'decode_tok_s_c{n}']:14.1f}{o[f'decode_tok_s_c{n}'] / hf[f'decode_tok_s_c{n}']:8.2f}"
        print(line)
    if len(conc) > 1:
        print(f"{f'{conc[-1]} req vs 1 req':24}{o[f'decode_tok_s_c{conc[-1]}'] / o['decode_tok_s_c1']:12.2f}x")
    print(f"{'peak memory MB':24}{o['peak_mem_mb']:12.0f}")


if __name__ == "__main__":
    sys.exit(main())
