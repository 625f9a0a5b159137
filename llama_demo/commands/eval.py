"""Perplexity of a model on a text file (also under torchrun).

    python -m llama_demo.eval --ckpt_dir DIR --text assets/pride_and_prejudice.txt --max_tokens 2048

The text is tokenized once and cut into windows of --window tokens (default: the whole
--max_tokens in one window, as the README's figures are measured); each window is fed in chunks
through the KV cache, and the mean negative log-likelihood of every token after the first of its
window gives the perplexity.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from ..model.parallel import init_distributed, parse_dtype
from .startup import add_quantize_arg, run_command
from ..weights.loading import load_model
from ..model.transformer import Transformer
from ..model.quant import weights_label
from ..text.tokenizer import find_tokenizer, load_tokenizer


def window_nll(model: Transformer, ids: list[int], device: torch.device, chunk: int = 512) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given their prefix in this window, and the count."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start: start + chunk + 1]
        inp = torch.tensor([piece[:-1]], device=device)
        pos = torch.arange(start, start + inp.shape[1], device=device)[None]
        logits = model(inp, pos, slice(0, 1), start + inp.shape[1])[0]  # (T, V) float32
        target = torch.tensor(piece[1:], device=device)
        total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        count += target.numel()
    return total, count


def perplexity(model: Transformer, ids: list[int], window: int, device: torch.device, progress: bool = False) -> float:
    windows = [ids[i: i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) > 1]
    if not windows:
        raise ValueError("the text is too short: it needs at least 2 tokens")
    if progress:
        from tqdm import tqdm

        windows = tqdm(windows, desc="perplexity", unit="window", file=sys.stderr)
    nll, n = 0.0, 0
    for w in windows:
        a, b = window_nll(model, w, device)
        nll, n = nll + a, n + b
    return math.exp(nll / n)


def hf_perplexity(ckpt_dir: Path, ids: list[int], window: int) -> float:
    """The reference: transformers' LlamaForCausalLM on the same weights, float32, same windows."""
    from ..weights.hf import hf_model_from_meta

    model = hf_model_from_meta(ckpt_dir, torch.float32, torch.device("cpu"))
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), window):
            w = torch.tensor([ids[i: i + window]])
            if w.shape[1] < 2:
                continue
            out = model(w, labels=w)
            nll, n = nll + out.loss.item() * (w.shape[1] - 1), n + w.shape[1] - 1
    return math.exp(nll / n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_demo.eval", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt_dir", required=True)
    p.add_argument("--tokenizer_path", default=None)
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--max_tokens", type=int, default=None, help="use only the first N tokens of the text")
    p.add_argument("--window", type=int, default=None, help="tokens per window (default: all of --max_tokens, else 2048)")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=False, help="prepend BOS to the text")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    add_quantize_arg(p)
    p.add_argument("--vs-hf", dest="vs_hf", action="store_true",
                   help="also compute transformers' perplexity on the same weights and tokens (one rank)")
    a = p.parse_args(argv)
    return run_command(lambda: _evaluate(a))


def _evaluate(a: argparse.Namespace) -> int:
    text = Path(a.text).read_text(encoding="utf-8")
    tok = load_tokenizer(find_tokenizer(a.ckpt_dir, a.tokenizer_path))
    ids = tok.encode(text, bos=a.bos)
    if a.max_tokens:
        ids = ids[: a.max_tokens]
    window = a.window or len(ids)
    info = init_distributed(device=a.device)
    model = load_model(a.ckpt_dir, info, parse_dtype(a.dtype), max_seq_len=window, max_batch_size=1,
                       quantize=a.quantize)
    ppl = perplexity(model, ids, window, info.device, progress=info.is_main)
    if info.is_main:
        print(f"perplexity {ppl:.3f} over {len(ids)} tokens of {Path(a.text).name} "
              f"(window {window}, {'BOS' if a.bos else 'no BOS'}, {info.world_size} rank(s), {weights_label(model)})")
    if a.vs_hf and info.is_main:
        print(f"transformers perplexity {hf_perplexity(Path(a.ckpt_dir), ids, window):.3f} (same tokens, float32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
