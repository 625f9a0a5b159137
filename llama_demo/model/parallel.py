"""Process group, device and model-parallel set-up: one code path for CPU/gloo and CUDA/NCCL."""
from __future__ import annotations

import contextlib
import functools
import io
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import DEFAULT_DIST_TIMEOUT


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server started next (tests, bench).

    Chosen below the kernel's ephemeral range: a port the OS hands out for port 0 is one it also
    gives to outgoing connections, and between this call and the server's bind another process's
    connection (gloo's rendezvous, an HTTP client) took it: EADDRINUSE on the request bus in CI."""
    import random

    low, _ = _ephemeral_range()
    candidates = list(range(max(1024, low - 12000), low)) if low > 2048 else []
    for port in random.sample(candidates, min(64, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the ephemeral range: let the OS choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = DEFAULT_DIST_TIMEOUT, device: str | None = None) -> DistInfo:
    """Join torchrun's process group (or make a one-rank group for a plain process) and set up
    fairscale's model-parallel group over all ranks. NCCL on GPUs, gloo on CPUs."""
    from fairscale.nn.model_parallel.initialize import initialize_model_parallel, model_parallel_is_initialized

    # plain `python -m ...`: a group of one, its rendezvous in this process's memory (a port picked
    # free and bound later could be taken in between by another process: EADDRINUSE seen in tests)
    alone = "RANK" not in os.environ
    if alone:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
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
        if alone:
            kw["store"] = dist.HashStore()
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                rank=rank, world_size=world, **kw)
    if not model_parallel_is_initialized():
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints three banner lines
            initialize_model_parallel(world)
    if not use_cuda:
        # Each step sets torch's thread count (cpu_kernels.set_cpu_threads). Where the C kernels
        # are not built, single-row products run in OpenBLAS's threads, and torch's spinning
        # threads left at the core count fight them for the cores (measured: 20x slower decode
        # steps on 2 cores), so between steps torch keeps one thread.
        torch.set_num_threads(1)
    return DistInfo(rank, world, local_rank, dev)


@functools.cache
def cpu_threads() -> int:
    """Cores one rank may use for batched matrix products: LLAMA_DEMO_TORCH_THREADS, else
    OMP_NUM_THREADS (torchrun sets 1 per rank when several ranks share a machine), else all.
    Read once: the model asks at every step."""
    for var in ("LLAMA_DEMO_TORCH_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
            return int(os.environ[var])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ----------------------------------------------------------------------------- collectives
# The model's collectives in the forward pass. On CPU with two ranks, gloo's all_reduce of a
# few KB costs 0.8-2 ms on the VMs we measured (a ring of chunked messages, each waking threads),
# while one ordered send/recv round trip costs ~0.15 ms; a decode step makes ~27 of them, so the
# two-rank CPU case exchanges with send/recv. Sums stay identical on both ranks: a + b == b + a.

def _pair(group) -> int | None:
    """The other rank's global id when `group` is two CPU ranks using gloo, else None."""
    group = group or dist.group.WORLD
    if dist.get_world_size(group) != 2 or dist.get_backend(group) != "gloo":
        return None
    ranks = dist.get_process_group_ranks(group)
    return ranks[1] if dist.get_rank() == ranks[0] else ranks[0]


def _exchange(x: torch.Tensor, peer: int, group) -> torch.Tensor:
    """Send x to peer and receive its tensor of the same shape; the lower rank sends first."""
    x = x.contiguous()
    other = torch.empty_like(x)
    if dist.get_rank() < peer:
        dist.send(x, peer, group=group)
        dist.recv(other, peer, group=group)
    else:
        dist.recv(other, peer, group=group)
        dist.send(x, peer, group=group)
    return other


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of x over the ranks of group (x may be overwritten)."""
    if dist.get_world_size(group) == 1:
        return x
    peer = _pair(group) if x.device.type == "cpu" else None
    if peer is not None:
        return x.add_(_exchange(x, peer, group))
    dist.all_reduce(x, group=group)
    return x


def all_gather_last(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the ranks' x along the last dimension, in rank order."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    peer = _pair(group) if x.device.type == "cpu" else None
    if peer is not None:
        other = _exchange(x, peer, group)
        parts = [x, other] if dist.get_rank() < peer else [other, x]
    else:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def gather_last_to_first(x: torch.Tensor, group) -> torch.Tensor:
    """all_gather_last on the group's first rank only (the others send their x and get an empty
    (..., 0) tensor back): half the traffic, and nothing waits on the followers' side."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    first = dist.get_process_group_ranks(group or dist.group.WORLD)[0]
    me = dist.get_rank()
    peer = _pair(group) if x.device.type == "cpu" else None
    x = x.contiguous()
    if peer is not None:
        if me != first:
            dist.send(x, peer, group=group)
            return x.new_empty(*x.shape[:-1], 0)
        other = torch.empty_like(x)
        dist.recv(other, peer, group=group)
        return torch.cat([x, other], dim=-1)
    parts = [torch.empty_like(x) for _ in range(world)] if me == first else None
    dist.gather(x, parts, dst=first, group=group)
    return torch.cat(parts, dim=-1) if me == first else x.new_empty(*x.shape[:-1], 0)


def broadcast_from_first(x: torch.Tensor, group) -> torch.Tensor:
    """x from the group's first rank, on every rank of the group."""
    if dist.get_world_size(group) == 1:
        return x
    peer = _pair(group) if x.device.type == "cpu" else None
    if peer is None:
        dist.broadcast(x, src=dist.get_process_group_ranks(group or dist.group.WORLD)[0], group=group)
    elif dist.get_rank() < peer:
        dist.send(x.contiguous(), peer, group=group)
    else:
        dist.recv(x, peer, group=group)
    return x


def shutdown_distributed() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a dead peer can make teardown fail; we are exiting anyway
            pass


def free_memory(device: torch.device) -> int:
    """Bytes this rank can still allocate on its device (0: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory()


def available_memory() -> int:
    """Bytes this process may still take: the kernel's MemAvailable, capped by a cgroup v2 limit
    (containers) when there is one. 0 when unknown (cpu_kernels.pack_for_cpu then packs nothing)."""
    free = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0
    try:
        with open("/sys/fs/cgroup/memory.max") as f_max, open("/sys/fs/cgroup/memory.current") as f_cur:
            limit = f_max.read().strip()
            if limit != "max":
                free = min(free, int(limit) - int(f_cur.read()))
    except (OSError, ValueError):
        pass
    return max(free, 0)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: a timer read before it would measure only the launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_dtype(device: torch.device, checkpoint_dtype: torch.dtype | None = None) -> torch.dtype:
    """float32 on CPU (half precision is ~70x slower there); on a GPU the checkpoint's half type,
    bfloat16 only where the GPU supports it (pre-Ampere GPUs get float16)."""
    if device.type == "cpu":
        return torch.float32
    bf16 = torch.cuda.is_bf16_supported()
    if checkpoint_dtype == torch.float16 or (checkpoint_dtype == torch.bfloat16 and bf16):
        return checkpoint_dtype
    return torch.bfloat16 if bf16 else torch.float16


def check_dtype(dtype: torch.dtype | None, device: torch.device) -> None:
    """Refuse a --dtype the device cannot run."""
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bfloat16: use --dtype float16 (or auto)")


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]
