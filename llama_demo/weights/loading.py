"""Build this rank's slice of the model from a checkpoint folder, never holding weights twice."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from .checkpoint import ShardedCheckpoint, is_quantized_weight, iter_rank_state, open_checkpoint, split_dim
from ..config import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_SEQ_LEN, ConfigError
from ..model.parallel import DistInfo, default_dtype, free_memory
from ..model.cpu_kernels import pack_for_cpu
from ..model.transformer import Transformer, fuse_linears, skip_fairscale_init


def load_model(ckpt_dir: str | Path, dist_info: DistInfo, dtype: torch.dtype | None = None,
               max_seq_len: int = DEFAULT_MAX_SEQ_LEN, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, progress: bool = True,
               quantize: str | None = None, optimize: bool = True, kv_cache_tokens: int | None = None,
               kv_cache_memory: float | None = None, kv_extra_bytes_per_token: int = 0) -> Transformer:
    """This rank's model: its slice of every split weight, in `dtype`, with a KV pool shared by at
    most max_batch_size running sequences of up to max_seq_len tokens: of `kv_cache_tokens`
    positions, or `kv_cache_memory` of the device memory free once the weights are in, or by
    default max_batch_size x max_seq_len positions (Transformer.setup_cache), a position counted
    `kv_extra_bytes_per_token` dearer in that memory (a draft model's pool of as many); `quantize` ("int8"/"int4") quantizes the
    linear layers' weights one tensor at a time as they load (quant.py: round-to-nearest). A
    checkpoint written by llama_demo.quantize (params.json "quantization") loads as stored, its
    integers straight into quantized layers: no float copy of its linear weights is ever made.
    `optimize` fuses and (on CPU) packs float weights for speed; off for a caller that changes
    layers' weights in place or hooks them one by one (GPTQ)."""
    ckpt = open_checkpoint(ckpt_dir, dist_info.world_size)
    args = ckpt.args
    dtype = dtype or default_dtype(dist_info.device, _checkpoint_dtype(ckpt))
    if ckpt.quant and quantize and quantize != ckpt.quant.method:
        raise ConfigError(f"{ckpt_dir} is already {ckpt.quant.method}-quantized; drop --quantize {quantize} "
                          f"or quantize its float source instead")
    on_the_fly = None
    if quantize and not ckpt.quant:
        from ..model.quant_format import spec_for

        on_the_fly = spec_for(quantize, args, dist_info.world_size)
    # Built on the meta device: fairscale's layers would otherwise allocate (and touch) a full
    # master weight per layer before we overwrite it with the checkpoint's slice.
    with torch.device("meta"), skip_fairscale_init():
        model = Transformer(args)
    if ckpt.quant or on_the_fly:
        from ..model.quant import quantize_weight, replace_linears

        replace_linears(model, ckpt.quant or on_the_fly)  # empty quantized layers, still on meta
    state = {}
    show = progress and dist_info.is_main and (sys.stderr.isatty() or _big(args))
    bar = _progress_bar(f"loading {Path(ckpt_dir).name} on {dist_info.world_size} rank(s)") if show else None
    # Quantizing on the fly starts from the stored precision (not `dtype`), one weight at a time.
    for name, tensor in iter_rank_state(ckpt, dist_info.rank, dist_info.world_size, None if on_the_fly else dtype, bar):
        tensor = tensor.to(dist_info.device)
        if is_quantized_weight(name, on_the_fly):
            state.update(quantize_weight(name, tensor, on_the_fly, split_dim(name) == 1))
        else:
            state[name] = tensor.to(dtype) if on_the_fly and tensor.is_floating_point() else tensor
    model.load_state_dict(state, strict=True, assign=True)
    del state  # the model holds the tensors now; fuse_linears can free each original as it goes
    model.requires_grad_(False)
    if ckpt.quant or on_the_fly:
        from ..model.quant import prepare_quantized

        prepare_quantized(model, dtype)  # scales to the compute dtype; CUDA kernels' packing
    if kv_cache_memory:
        kv_cache_tokens = kv_tokens_in_memory(model, dist_info, dtype, kv_cache_memory, kv_extra_bytes_per_token)
    model.setup_cache(max_batch_size, max_seq_len, dist_info.device, dtype, kv_tokens=kv_cache_tokens)
    if optimize and (ckpt.quant or on_the_fly):
        from ..model.quant import fuse_quantized

        fuse_quantized(model)  # wq/wk/wv and w1/w3 as one native product each, where they run one
    if optimize and not (ckpt.quant or on_the_fly):
        fuse_linears(model)  # wq/wk/wv and w1/w3 as one product each
        share_tied_output(model, dist_info.world_size)  # one copy when the output layer is the embedding
        if dist_info.device.type == "cpu" and dtype == torch.float32:
            pack_for_cpu(model)  # oneDNN's blocked copies, only with LLAMA_DEMO_PACK_WEIGHTS=1 (it says why)
    model.eval()
    if optimize and dist_info.device.type == "cpu":
        from ..model.native_decode import plan_for

        plan_for(model)  # the C step's plan and its probe now, on every rank together, not at a first request
    return model


def share_tied_output(model: Transformer, world_size: int) -> bool:
    """A model whose output layer holds the token embedding's matrix (tied weights: SmolLM2, Llama
    3.2 1B / 3B; Meta-layout checkpoints store it twice) keeps one copy: the output layer reads the
    embedding's tensor (SmolLM2-135M in float32: 108 MB less). On one rank only: with several the
    embedding is split by features and the output by vocabulary rows, different slices. Float
    weights only (a quantized embedding's layout is not the linear layer's). Returns whether it
    shared. Callers that change weights in place (GPTQ) load with optimize=False, which skips this."""
    emb, out = model.tok_embeddings.weight, model.output.weight
    if (world_size != 1 or not emb.is_floating_point() or not out.is_floating_point() or emb.shape != out.shape
            or emb.dtype != out.dtype or emb.device != out.device or emb.data_ptr() == out.data_ptr()
            or not torch.equal(emb, out)):
        return False
    model.output.weight = emb
    model.invalidate_decode_plan()
    return True


def kv_tokens_in_memory(model: Transformer, dist_info: DistInfo, dtype: torch.dtype, fraction: float,
                        extra_bytes_per_token: int = 0) -> int:
    """KV positions that `fraction` of this device's free memory holds, each costing
    `extra_bytes_per_token` more than its own (a draft's pool beside it), the least over the
    ranks: every rank must have the same pool (their schedulers place every token alike)."""
    per_token = model.args.kv_bytes_per_token(dist_info.world_size, torch.finfo(dtype).bits // 8) + extra_bytes_per_token
    tokens = torch.tensor([int(free_memory(dist_info.device) * fraction) // per_token], device=dist_info.device)
    if dist_info.world_size > 1:
        torch.distributed.all_reduce(tokens, op=torch.distributed.ReduceOp.MIN)
    tokens = int(tokens.item())
    if tokens < model.args.max_seq_len:
        raise ConfigError(f"--kv_cache_memory {fraction} of the free {dist_info.device.type} memory holds {tokens} "
                          f"KV positions, fewer than one sequence of --max_seq_len {model.args.max_seq_len}: raise it, "
                          "lower --max_seq_len, or use more ranks")
    return tokens


def _checkpoint_dtype(ckpt: ShardedCheckpoint) -> torch.dtype:
    return ckpt.shard(0)["norm.weight"].dtype


def _big(args) -> bool:
    return args.dim * args.dim * args.n_layers > 5e8  # ~> 1B parameters: loading takes a while


def _progress_bar(desc: str):
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, unit="tensor", file=sys.stderr, mininterval=0.5)
