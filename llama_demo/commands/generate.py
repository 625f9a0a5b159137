"""Text completion from the command line, on one process or under torchrun.

    torchrun --nproc_per_node 2 -m llama_demo.generate --ckpt_dir models/13B \
        --tokenizer_path models/tokenizer.model --prompt "The capital of France is" --max_new_tokens 32
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ..config import ConfigError
from ..model.parallel import init_distributed, parse_dtype, shutdown_distributed
from ..engine.engine import Engine, Request, TokenEvent
from ..weights.loading import load_model
from ..engine.sampler import SamplingParams
from ..text.tokenizer import Tokenizer, load_tokenizer


def find_tokenizer(ckpt_dir: str | Path, tokenizer_path: str | Path | None) -> Path:
    """--tokenizer_path, else the model folder's own tokenizer (Llama 3, converted models), else the
    original/ subfolder's (a Hugging Face repo of Meta's files), else Meta's tokenizer.model one
    level up (LLaMA 1/2 keep it beside the size folders)."""
    if tokenizer_path:
        return Path(tokenizer_path)
    ckpt_dir = Path(ckpt_dir)
    for cand in (ckpt_dir / "tokenizer.json", ckpt_dir / "tokenizer.model", ckpt_dir / "original" / "tokenizer.model",
                 ckpt_dir.parent / "tokenizer.model"):
        if cand.is_file():
            return ckpt_dir if cand.name == "tokenizer.json" else cand
    raise ConfigError(f"no tokenizer found: pass --tokenizer_path, or put tokenizer.model in {ckpt_dir} or {ckpt_dir.parent}")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt_dir", required=True, help="folder with params.json and consolidated.NN.pth")
    p.add_argument("--tokenizer_path", default=None, help="tokenizer.model / tokenizer.json (default: found beside the checkpoint)")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, the checkpoint's half type on GPU), float32, float16, bfloat16")
    p.add_argument("--max_seq_len", type=int, default=2048, help="context length: prompt + answer")
    p.add_argument("--max_batch_size", type=int, default=8, help="sequences decoded together")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--prefill_chunk", type=int, default=None,
                   help="prompt tokens prefilled per step while other requests decode (default: 512 on GPU, 128 on CPU)")
    add_quantize_arg(p)


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    """One spelling of --quantize for every command that loads a model (generate, the server, eval, bench)."""
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="quantize linear weights at load (round-to-nearest); a checkpoint written by "
                        "python -m llama_demo.quantize needs no flag")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def sampling_from_args(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, repetition_penalty=a.repetition_penalty,
                          max_new_tokens=a.max_new_tokens, stop=list(a.stop)).validate()


def build_engine(a: argparse.Namespace, dist_timeout: float = 1800.0) -> tuple[Engine, Tokenizer]:
    """Tokenizer, process group, this rank's model slice, engine: the shared start-up of every entry point."""
    tokenizer = load_tokenizer(find_tokenizer(a.ckpt_dir, a.tokenizer_path))
    info = init_distributed(dist_timeout, a.device)
    model = load_model(a.ckpt_dir, info, parse_dtype(a.dtype), a.max_seq_len, a.max_batch_size, quantize=a.quantize)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.args.vocab_size}: wrong tokenizer for {a.ckpt_dir}?")
    engine = Engine(model, tokenizer, info.rank, info.world_size, info.device, seed=getattr(a, "seed", None),
                    prefill_chunk=a.prefill_chunk)
    return engine, tokenizer


class _StreamPrinter:
    """Prints completions in prompt order as they are generated, buffering those further on."""

    def __init__(self, prompts: list[str]):
        self.prompts, self.current = prompts, 0
        self.buffers = [[] for _ in prompts]
        self.done = [False] * len(prompts)
        self._header(0)

    def _header(self, i: int) -> None:
        sys.stdout.write(("\n" if i else "") + (f"==> prompt {i + 1}\n" if len(self.prompts) > 1 else "") + self.prompts[i])
        sys.stdout.flush()

    def __call__(self, ev: TokenEvent) -> None:
        i = ev.request_id
        self.buffers[i].append(ev.text)
        self.done[i] = self.done[i] or ev.finished
        while self.current < len(self.prompts):
            sys.stdout.write("".join(self.buffers[self.current]))
            self.buffers[self.current].clear()
            if not self.done[self.current]:
                break
            self.current += 1
            if self.current < len(self.prompts):
                self._header(self.current)
        sys.stdout.flush()


def run_command(body: Callable[[], int]) -> int:
    """A command's body, with the ending every entry point shares: a ValueError or OSError
    (ConfigError, CheckpointError, PromptTooLong, SamplingError, ...) is the user's to fix, so it
    comes out once, from rank 0, as one `error: ...` line and exit code 2, never as a traceback
    per rank; the process group is shut down however the body ends."""
    rank = int(os.environ.get("RANK", 0))  # known before the process group exists
    try:
        return body()
    except (ValueError, OSError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_demo.generate", description=__doc__.splitlines()[0])
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable: a batch)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    p.add_argument("--bos", choices=["auto", "yes", "no"], default="auto", help="BOS before the prompt (auto: as the tokenizer says)")
    a = p.parse_args(argv)
    return run_command(lambda: _generate(a))


def _generate(a: argparse.Namespace) -> int:
    rank = int(os.environ.get("RANK", 0))
    params = sampling_from_args(a)
    engine, tok = build_engine(a)
    bos = None if a.bos == "auto" else a.bos == "yes"
    reqs = [Request(i, tok.encode(text, bos=bos), params) for i, text in enumerate(a.prompt)]
    for r in reqs:
        engine.validate(r)
    printer = _StreamPrinter(a.prompt) if rank == 0 and not a.json else None
    results = engine.generate(reqs, on_event=printer)
    if rank == 0:
        if a.json:
            for r, text in zip(reqs, a.prompt):
                ids, completion, reason = results[r.id]
                print(json.dumps({"prompt": text, "completion": completion, "tokens": ids, "finish_reason": reason}, ensure_ascii=False))
        else:
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
