"""Build this rank's slice of the model from a checkpoint folder, never holding weights twice."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from .checkpoint import ShardedCheckpoint, iter_rank_state, open_checkpoint
from .distributed import DistInfo, default_dtype
from .model import Transformer, skip_fairscale_init


def load_model(ckpt_dir: str | Path, dist_info: DistInfo, dtype: torch.dtype | None = None,
               max_seq_len: int = 2048, max_batch_size: int = 8, progress: bool = True,
               quantize: str | None = None) -> Transformer:
    """This rank's model: its slice of every split weight, in `dtype`, with a KV cache for
    max_batch_size sequences of max_seq_len tokens; `quantize` ("int8"/"int4") converts the
    linear layers' weights at load (a checkpoint written by llama_demo.quantize is loaded as is)."""
    ckpt = open_checkpoint(ckpt_dir, dist_info.world_size)
    args = ckpt.args
    dtype = dtype or default_dtype(dist_info.device, _checkpoint_dtype(ckpt))
    # Built on the meta device: fairscale's layers would otherwise allocate (and touch) a full
    # master weight per layer before we overwrite it with the checkpoint's slice.
    with torch.device("meta"), skip_fairscale_init():
        model = Transformer(args)
    state = {}
    show = progress and dist_info.is_main and sys.stderr.isatty() or (progress and dist_info.is_main and _big(args))
    bar = _progress_bar(f"loading {Path(ckpt_dir).name} on {dist_info.world_size} rank(s)") if show else None
    for name, tensor in iter_rank_state(ckpt, dist_info.rank, dist_info.world_size, dtype, bar):
        state[name] = tensor.to(dist_info.device)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    if quantize:
        from .quant import quantize_model

        quantize_model(model, quantize)
    model.setup_cache(max_batch_size, max_seq_len, dist_info.device, dtype)
    return model.eval()


def _checkpoint_dtype(ckpt: ShardedCheckpoint) -> torch.dtype:
    return ckpt.shard(0)["norm.weight"].dtype


def _big(args) -> bool:
    return args.dim * args.dim * args.n_layers > 5e8  # ~> 1B parameters: loading takes a while


def _progress_bar(desc: str):
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, unit="tensor", file=sys.stderr, mininterval=0.5)
