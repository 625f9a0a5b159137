"""Write a weight-quantized checkpoint: int8 per channel, or int4 group-wise by GPTQ on a
calibration text (or by round-to-nearest).

    python -m llama_demo.quantize --ckpt_dir IN --out OUT --method int8
    python -m llama_demo.quantize --ckpt_dir IN --out OUT --method int4 \\
        --calib_text assets/pride_and_prejudice.txt --calib_tokens 8192 --calib_skip 4096

The output is Meta's layout (params.json + consolidated.NN.pth, --shards files) with params.json's
"quantization" entry (model/quant_format.QuantSpec describes the tensors); the tokenizer files are copied,
so the folder is served, evaluated and resharded like any other (any shard count on any rank count
whose slices hold whole int4 groups).

Runs as one process on the whole float model (fine for the sizes this demo quantizes: a 7B model
needs about 28 GB of float32 here); under torchrun it refuses.

GPTQ is sequential, as in the paper's LLaMA script: the calibration tokens are fed through the
float model one transformer block at a time; inside a block the linears are quantized in the order
the data reaches them (wq/wk/wv, then wo, then w1/w3, then w2), each with the Hessian of its inputs
as they are once the earlier ones are quantized; the quantized block's outputs are the next block's
inputs; last, the output layer on the final norm's outputs.

Defaults, from measurements on SmolLM2-135M: act-order on (columns by decreasing Hessian diagonal,
group parameters fixed up front so the stored layout is unchanged: lower layer error on held-out
tokens for every layer we checked); 8192 calibration tokens in sequences of 512 (with 2048, the
1536-input w2 layers fit the calibration tokens and not others: the Hessian's estimate is too poor).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .checkpoint import is_quantized_weight, open_checkpoint, save_sharded, split_dim
from .folder import TOKENIZER_FILES, atomic_dir, check_out_dir
from ..config import ConfigError
from ..model.quant import quantize_weight
from ..model.quant_format import QuantSpec, dequantize_int4, gptq_int4, spec_for
from ..model.parts import Part
from ..text.tokenizer import tokenizer_file

DEFAULT_CALIB_TEXT = "assets/pride_and_prejudice.txt"
# The eval figures use the text's first 2048 tokens: calibrating after 4096 keeps them unseen.
DEFAULT_CALIB_SKIP = 4096


class Hessian:
    """2 X^T X / n over every input row a layer sees (forward pre-hook): GPTQ's proxy Hessian of
    the layer's squared output error."""

    def __init__(self, layer: nn.Module):
        self.sum: torch.Tensor | None = None
        self.n = 0
        self.handle = layer.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
        self.sum = x.T @ x if self.sum is None else self.sum + x.T @ x
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        self.handle.remove()
        return 2 * self.sum / self.n


# The order in which data reaches a block's linears: each group is quantized before the next
# group's inputs are recorded.
BLOCK_GROUPS = (("attention.wq", "attention.wk", "attention.wv"), ("attention.wo",),
                ("feed_forward.w1", "feed_forward.w3"), ("feed_forward.w2",))


def calibration_ids(tokenizer, text: str, n_tokens: int, skip: int, seq_len: int) -> torch.Tensor:
    """(n_seq, seq_len) token ids: the text's tokens [skip, skip + n_tokens), in whole sequences."""
    ids = tokenizer.encode(text, bos=False)
    if n_tokens < 2 or seq_len < 2:
        raise ConfigError(f"--calib_tokens and --calib_seq_len must be at least 2 (got {n_tokens}, {seq_len})")
    seq_len = min(seq_len, n_tokens)
    have = len(ids) - skip
    if have < n_tokens:
        raise ConfigError(f"the calibration text has {len(ids)} tokens; skipping {skip} leaves {max(have, 0)}, "
                          f"fewer than --calib_tokens {n_tokens}: use a longer text, a smaller --calib_skip or --calib_tokens")
    n_seq = n_tokens // seq_len
    return torch.tensor(ids[skip: skip + n_seq * seq_len]).view(n_seq, seq_len)


@torch.no_grad()
def gptq_quantize(model, tokens: torch.Tensor, spec: QuantSpec, damp: float = 0.01, act_order: bool = True,
                  log: Callable[[str], None] = lambda s: None) -> dict[str, torch.Tensor]:
    """Sequential GPTQ over a one-rank float model (loaded with a KV cache for tokens' shape, and
    optimize=False so that each linear layer runs on its own weight):
    the quantized tensors of every linear layer, by Meta name. Leaves the model's linear weights
    dequantized (each block's outputs are computed with its quantized weights)."""
    n_seq, T = tokens.shape
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    pos = torch.arange(T, device=device)[None]
    rope = model.rope[pos]  # (1, T, head_dim/2)

    def run(block, h: torch.Tensor) -> torch.Tensor:
        # one sequence at a time (cache row b): attention scores of all of them at once would take GBs
        return torch.cat([block(h[b: b + 1], rope, [Part.of(0, model.row_tables([b], device), pos, model.block_size)])
                          for b in range(n_seq)])

    def quantize_layer(name: str, layer: nn.Module, H: torch.Tensor) -> None:
        packed, scales, zeros = gptq_int4(layer.weight, H, spec.group_size, damp=damp, act_order=act_order)
        out[name + ".weight"], out[name + ".scales"], out[name + ".zeros"] = packed, scales, zeros
        layer.weight.copy_(dequantize_int4(packed, scales, zeros, spec.group_size, layer.weight.dtype))

    out: dict[str, torch.Tensor] = {}
    h = torch.cat([model.tok_embeddings(tokens[b: b + 1]) for b in range(n_seq)])
    t0 = time.perf_counter()
    for i, block in enumerate(model.layers):
        for group in BLOCK_GROUPS:
            layers = [block.get_submodule(n) for n in group]
            hessian = Hessian(layers[0])  # a group's layers share their input
            run(block, h)
            H = hessian.value()
            for n, layer in zip(group, layers):
                quantize_layer(f"layers.{i}.{n}", layer, H)
        h = run(block, h)  # the quantized block's outputs feed the next block
        log(f"block {i + 1}/{len(model.layers)} quantized ({time.perf_counter() - t0:.0f} s)")
    x = model.norm(h).reshape(-1, h.shape[-1]).double()
    quantize_layer("output", model.output, 2 * x.T @ x / x.shape[0])
    return out


def quantize_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, method: str, *,
                        group_size: int | None = None, algorithm: str | None = None, calib_text: str | None = None,
                        calib_tokens: int = 8192, calib_skip: int = DEFAULT_CALIB_SKIP, calib_seq_len: int = 512,
                        damp: float = 0.01, act_order: bool = True, shards: int = 1, device: str | None = None,
                        log: Callable[[str], None] = lambda s: None) -> QuantSpec:
    """Quantize a float checkpoint folder into out_dir; returns what was written."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    ckpt = open_checkpoint(ckpt_dir, 1)
    args = ckpt.args
    if ckpt.quant is not None:
        raise ConfigError(f"{ckpt_dir} is already {ckpt.quant.method}-quantized; quantize its float source instead")
    algorithm = algorithm or ("gptq" if method == "int4" else "rtn")
    if method == "int8" and algorithm != "rtn":
        raise ConfigError("int8 is per-channel round-to-nearest only; --algorithm gptq is for int4")
    if shards < 1:
        raise ConfigError(f"--shards must be at least 1, got {shards}")
    spec = spec_for(method, args, 1, group_size, algorithm)
    spec.check(args, shards, "shard")
    args.check_world_size(shards)
    check_out_dir(out_dir)  # before minutes of calibration, not after
    state: dict[str, torch.Tensor] = {}
    if algorithm == "gptq":
        state.update(_run_gptq(ckpt_dir, spec, calib_text, calib_tokens, calib_skip, calib_seq_len, damp, act_order,
                               device, log))
    for name in ckpt.full_shapes:  # the float tensors as stored; RTN for the linears unless GPTQ did them
        if name in state:
            continue
        t = ckpt.rank_slice(name, 0, 1)
        state.update(quantize_weight(name, t, spec, split_dim(name) == 1) if is_quantized_weight(name, spec) else {name: t})
    extra = {k: v for k, v in json.loads((ckpt.paths[0].parent / "params.json").read_text()).items()
             if k not in args.to_params() and k not in ("quantization", "converted_from")}
    with atomic_dir(out_dir) as tmp:
        save_sharded(state, args, tmp, shards, extra_params=extra, quant=spec)
        _copy_tokenizer(ckpt_dir, tmp)
    return spec


def _run_gptq(ckpt_dir: Path, spec: QuantSpec, calib_text: str | None, calib_tokens: int, calib_skip: int,
              calib_seq_len: int, damp: float, act_order: bool, device: str | None,
              log: Callable[[str], None]) -> dict[str, torch.Tensor]:
    from ..model.parallel import init_distributed, shutdown_distributed
    from .loading import load_model
    from ..text.tokenizer import find_tokenizer, load_tokenizer

    text_path = Path(calib_text or DEFAULT_CALIB_TEXT)
    if not text_path.is_file():
        raise ConfigError(f"calibration text {text_path} not found; pass --calib_text FILE (UTF-8 text)")
    tok = load_tokenizer(find_tokenizer(ckpt_dir, None))
    tokens = calibration_ids(tok, text_path.read_text(encoding="utf-8"), calib_tokens, calib_skip, calib_seq_len)
    log(f"GPTQ int4 (group {spec.group_size}{', act-order' if act_order else ''}) on {tokens.numel()} tokens of "
        f"{text_path.name} [{calib_skip}, {calib_skip + tokens.numel()}) in {tokens.shape[0]} sequence(s) of {tokens.shape[1]}")
    info = init_distributed(device=device)
    try:
        # optimize=False: each linear runs its own forward (its input hook sees it) on its own weight
        model = load_model(ckpt_dir, info, torch.float32, max_seq_len=tokens.shape[1], max_batch_size=tokens.shape[0],
                           progress=False, optimize=False)
        return {k: v.cpu() for k, v in gptq_quantize(model, tokens, spec, damp, act_order, log).items()}
    finally:
        shutdown_distributed()


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """The tokenizer files, copied as they are, so the quantized folder is served as is (a
    tokenizer.model found elsewhere, in original/ or one level up as LLaMA 1/2 keep it, is copied in)."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    found = tokenizer_file(src)
    if found is not None and not (dst / found.name).exists():
        shutil.copy2(found, dst / found.name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_demo.quantize", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt_dir", required=True, help="a float checkpoint folder (params.json + consolidated.NN.pth)")
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--method", required=True, choices=["int8", "int4"])
    p.add_argument("--algorithm", choices=["gptq", "rtn"], default=None,
                   help="int4 only: gptq (default; calibrated) or rtn (round-to-nearest, no calibration)")
    p.add_argument("--group_size", type=int, default=None,
                   help="int4 input columns per scale and zero (default 32; larger groups take fewer bytes and "
                        "lose more accuracy)")
    p.add_argument("--calib_text", default=DEFAULT_CALIB_TEXT, help="UTF-8 text whose tokens calibrate GPTQ")
    p.add_argument("--calib_tokens", type=int, default=8192, help="calibration tokens (whole sequences of --calib_seq_len)")
    p.add_argument("--calib_skip", type=int, default=DEFAULT_CALIB_SKIP,
                   help="tokens of the text skipped first (default 4096: the eval's first 2048 stay unseen)")
    p.add_argument("--calib_seq_len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening: this fraction of mean(diag H) is added to H")
    p.add_argument("--act_order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: quantize columns by decreasing Hessian diagonal (default on)")
    p.add_argument("--shards", type=int, default=1, help="consolidated.NN.pth files to write")
    p.add_argument("--device", default="cpu", help="where GPTQ runs (cpu or cuda)")
    a = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("error: run the quantize command as one process (python -m llama_demo.quantize), not under torchrun",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        spec = quantize_checkpoint(a.ckpt_dir, a.out, a.method, group_size=a.group_size, algorithm=a.algorithm,
                                   calib_text=a.calib_text, calib_tokens=a.calib_tokens, calib_skip=a.calib_skip,
                                   calib_seq_len=a.calib_seq_len, damp=a.damp, act_order=a.act_order, shards=a.shards,
                                   device=a.device, log=lambda s: print(s, file=sys.stderr))
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    detail = f", group {spec.group_size}" if spec.method == "int4" else ""
    print(f"wrote {a.out} ({spec.method} {spec.algorithm}{detail}, {a.shards} shard(s), {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
