"""Speed and memory of the engine, with Hugging Face transformers side by side in the same run.

    python -m llama_demo.bench --shape 110M --vs-hf
    torchrun --nproc_per_node 2 -m llama_demo.bench --shape 110M
    python -m llama_demo.bench --ckpt_dir models/7B --dtype bfloat16
    python -m llama_demo.bench --ckpt_dir DIR --weights float32,int8,int4,gptq=QUANTIZED_DIR

Reports time to first token, batch-1 decode tokens/s, aggregate tokens/s with 1, 4 and 16
concurrent requests (continuous batching), and peak memory. A named shape gets random weights,
written once as a Meta checkpoint into the cache so that every peer reads the same weights.
`--weights` compares precisions of one model side by side (bench_weights.py), `--scenario chat`
runs conversations on the engine (bench_serving.py), `--scenario serve` the HTTP server beside
llama-server (bench_http.py); the figures they share are measured in bench_measure.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ..config import DEFAULT_SPECULATIVE_TOKENS, NAMED_SHAPES, cache_root
from ..engine.engine import Engine
from ..model.parallel import cpu_threads, init_distributed, parse_dtype
from ..model.quant import weights_label
from ..weights.hf import hf_model_from_meta
from ..weights.loading import load_model
from .bench_measure import NoTextTokenizer, bench_engine, bench_hf, random_checkpoint
from .bench_weights import bench_weights, default_gguf, parse_weights
from .startup import add_quantize_arg, positive_int, run_command


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
    p.add_argument("--scenario", choices=["chat", "serve", "speculative"], default=None,
                   help="chat: a multi-turn conversation's time to first token with prefix reuse on and off, "
                        "conversations sharing a long system prompt, 32 chats at once in the KV memory of 8 x 2048 "
                        "positions, and running decodes' rate while a long prompt is prefilled (needs --ckpt_dir of "
                        "a chat model); "
                        "serve: the HTTP server under streamed clients (--concurrency, --rates) beside llama-server; "
                        "speculative: the server with and without --speculative ngram, on input-grounded and open "
                        "chat requests at 1 user and the largest --concurrency, beside llama-server with and "
                        "without its own n-gram speculation")
    p.add_argument("--speculative_methods", default="ngram",
                   help="with --scenario speculative: our --speculative methods to run, comma-separated (ngram, "
                        "int8, int4, draft with --draft_ckpt_dir)")
    p.add_argument("--draft_ckpt_dir", default=None, help="with --scenario speculative and the draft method: its folder")
    p.add_argument("--num_speculative_tokens", type=int, default=DEFAULT_SPECULATIVE_TOKENS,
                   help="with --scenario speculative: proposed tokens per verification, for both servers")
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="with --scenario serve / speculative: interleaved rounds of every load on every server; "
                        "the figures are their medians")
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
    if a.scenario == "speculative":
        if not a.ckpt_dir or a.ranks:
            p.error("--scenario speculative starts app.py on one rank: give --ckpt_dir")
        methods = tuple(m for m in a.speculative_methods.split(",") if m)
        if not methods or set(methods) - {"ngram", "int8", "int4", "draft"}:
            p.error(f"--speculative_methods: ngram, int8, int4 or draft, got {a.speculative_methods!r}")
        if ("draft" in methods) != bool(a.draft_ckpt_dir):
            p.error("--speculative_methods draft and --draft_ckpt_dir go together")
        return run_command(lambda: _bench_speculative(a, conc, methods))
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
        return run_command(lambda: bench_weights(a, conc, weights))
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
    engine = Engine(model, NoTextTokenizer(), info.rank, info.world_size, info.device, seed=0)
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
    gguf = Path(a.gguf) if a.gguf else default_gguf(a.ckpt_dir) if server else None
    if server and gguf is None:
        print("no GGUF for llama-server (--gguf): measuring llama_demo alone", flush=True)
    if server is None:
        print("llama-server not found (--llama_server, $LLAMA_SERVER or PATH): measuring llama_demo alone", flush=True)
    weights = [w for w, _, _ in parse_weights(a.weights)] if a.weights else ["float32"]
    text = a.text if a.text != "assets/pride_and_prejudice.txt" else str(Path(__file__).resolve().parents[2] / a.text)
    rows = bench_http.serve_scenario(a.ckpt_dir, weights, conc, [float(r) for r in a.rates.split(",") if r],
                                     a.requests, a.new_tokens, text, a.threads, server, gguf, a.server_args.split(),
                                     cache_root() / "bench" / "llama.cpp", cache_root() / "bench" / "serve-logs",
                                     a.rounds)
    if a.rounds > 1:
        print(f"medians of {a.rounds} interleaved rounds:")
        for r in rows:
            bench_http.print_row(r)
    bench_http.print_ratios(rows)
    if a.json:
        print(json.dumps(rows))
    return 0


def _bench_speculative(a: argparse.Namespace, conc: list[int], methods: tuple[str, ...]) -> int:
    from . import bench_http, bench_speculative

    server = bench_http.find_llama_server(a.llama_server)
    gguf = Path(a.gguf) if a.gguf else default_gguf(a.ckpt_dir) if server else None
    if server is None or gguf is None:
        print("llama-server or a GGUF not found: measuring llama_demo alone", flush=True)
    text = a.text if a.text != "assets/pride_and_prejudice.txt" else str(Path(__file__).resolve().parents[2] / a.text)
    rows = bench_speculative.speculative_scenario(a.ckpt_dir, conc, a.requests, a.new_tokens, text, a.threads, server,
                                                  gguf, a.num_speculative_tokens, cache_root() / "bench" / "llama.cpp",
                                                  cache_root() / "bench" / "serve-logs", methods, a.draft_ckpt_dir,
                                                  a.rounds)
    if a.rounds > 1:
        print(f"medians of {a.rounds} interleaved rounds:")
        for r in rows:
            bench_speculative.print_row(r)
    bench_speculative.print_ratios(rows)
    if a.json:
        print(json.dumps(rows))
    return 0


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
