"""Text completion from the command line, on one process or under torchrun.

    torchrun --nproc_per_node 2 -m llama_demo.generate --ckpt_dir models/13B \
        --tokenizer_path models/tokenizer.model --prompt "The capital of France is" --max_new_tokens 32
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..config import CLI_SAMPLING
from ..engine.engine import Request, TokenEvent
from ..engine.sampler import SamplingParams
from .startup import add_model_args, build_engine, run_command


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max_new_tokens", type=int, default=CLI_SAMPLING.max_new_tokens)
    p.add_argument("--temperature", type=float, default=CLI_SAMPLING.temperature, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=CLI_SAMPLING.top_p)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def sampling_from_args(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, repetition_penalty=a.repetition_penalty,
                          max_new_tokens=a.max_new_tokens, stop=list(a.stop)).validate()


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
