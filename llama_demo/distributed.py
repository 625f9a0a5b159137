"""Process group, device and model-parallel set-up: one code path for CPU/gloo and CUDA/NCCL."""
from __future__ import annotations

import contextlib
import io
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 1800.0, device: str | None = None) -> DistInfo:
    """Join torchrun's process group (or make a one-rank group for a plain process) and set up
    fairscale's model-parallel group over all ranks. NCCL on GPUs, gloo on CPUs."""
    from fairscale.nn.model_parallel.initialize import initialize_model_parallel, model_parallel_is_initialized

    if "RANK" not in os.environ:  # plain `python -m ...`: a group of one, on a private port
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        if torch.cuda.device_count() <= local_rank:
            raise RuntimeError(f"rank {rank} wants GPU {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        kw = {"device_id": dev} if use_cuda else {}
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                rank=rank, world_size=world, **kw)
    if not model_parallel_is_initialized():
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints three banner lines
            initialize_model_parallel(world)
    if not use_cuda:
        # On CPU the matrix products run in OpenBLAS's threads (model.matmul_t; OpenBLAS takes its
        # thread count from OPENBLAS_NUM_THREADS or OMP_NUM_THREADS, which torchrun sets to 1 for
        # several ranks). torch's own thread pool only runs small element-wise ops; left at the
        # core count, its spinning threads fight OpenBLAS's for the cores (measured: 20x slower
        # decode steps on 2 cores), so it gets one thread.
        torch.set_num_threads(int(os.environ.get("LLAMA_DEMO_TORCH_THREADS", "1")))
    return DistInfo(rank, world, local_rank, dev)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a dead peer can make teardown fail; we are exiting anyway
            pass


def default_dtype(device: torch.device, checkpoint_dtype: torch.dtype | None = None) -> torch.dtype:
    """float32 on CPU (half precision is ~70x slower there); the checkpoint's half type on GPU."""
    if device.type == "cpu":
        return torch.float32
    if checkpoint_dtype in (torch.float16, torch.bfloat16):
        return checkpoint_dtype
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]
