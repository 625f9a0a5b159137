"""The start-up every command shares: model flags, tokenizer lookup, process group, this rank's
model slice and the engine; and the one way a command ends on a user error."""
from __future__ import annotations

import argparse
import os
import select
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import DEFAULT_DIST_TIMEOUT, DEFAULT_SPECULATIVE_TOKENS, DEFAULT_KV_ROWS, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_SEQ_LEN, ConfigError, ModelArgs
from ..engine.engine import Engine
from ..engine.speculative import SpeculationConfig
from ..model.transformer import Transformer
from ..model.parallel import DistInfo, check_dtype, free_memory, init_distributed, parse_dtype, shutdown_distributed
from ..text.tokenizer import Tokenizer, find_tokenizer, load_tokenizer
from ..weights.folder import model_folder
from ..weights.loading import load_model


def add_model_args(p: argparse.ArgumentParser, ckpt_help: str | None = None) -> None:
    """The model flags; with `ckpt_help`, --ckpt_dir is optional (the server's default model)."""
    p.add_argument("--ckpt_dir", required=ckpt_help is None, default=None,
                   help=ckpt_help or "folder with params.json and consolidated.NN.pth")
    p.add_argument("--tokenizer_path", default=None, help="tokenizer.model / tokenizer.json (default: found beside the checkpoint)")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, the checkpoint's half type on GPU), float32, float16, bfloat16")
    p.add_argument("--max_seq_len", type=int, default=DEFAULT_MAX_SEQ_LEN, help="context length: prompt + answer")
    p.add_argument("--max_batch_size", type=positive_int, default=DEFAULT_MAX_BATCH_SIZE,
                   help="sequences running together at most (they share the KV cache's blocks)")
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv_cache_tokens", type=positive_int, default=None,
                    help=f"KV cache size in tokens, shared by every running sequence (default: {DEFAULT_KV_ROWS} x "
                         "--max_seq_len); at least --max_seq_len")
    kv.add_argument("--kv_cache_memory", type=fraction, default=None,
                    help="KV cache size as this fraction (0..1) of the device memory free once the weights are loaded")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--step_tokens", "--prefill_chunk", dest="step_tokens", type=positive_int, default=None,
                   help="tokens one step feeds: every running decode, then waiting prompts in arrival order, a "
                        "prompt split over steps only when it does not fit (default: measured at start-up, the "
                        "chunk a full batch of decodes takes in fastest)")
    p.add_argument("--no_prefix_cache", action="store_true",
                   help="prefill every prompt in full (default: reuse the longest prefix a free KV row still holds)")
    add_quantize_arg(p)
    spec = p.add_argument_group("speculative decoding (exact: the answers are the model's own)")
    spec.add_argument("--speculative", default=None, choices=["ngram", "draft", "int8", "int4"],
                      help="propose tokens and verify them in one step: ngram = prompt lookup (the longest "
                           "recent n-gram found earlier in the prompt or answer proposes what followed it; "
                           "pays off where answers quote their input: rewrites, edits, code, RAG); draft = a "
                           "smaller model with the same vocabulary (--draft_ckpt_dir) proposes; int8 / int4 = "
                           "the served model's own weights, quantized at load, propose (the answers stay the "
                           "served model's)")
    spec.add_argument("--draft_ckpt_dir", default=None,
                      help="with --speculative draft: the draft model's folder (e.g. Llama 3.2 1B for Llama 3.1 "
                           "8B), loaded like --ckpt_dir, on the same ranks")
    spec.add_argument("--num_speculative_tokens", type=positive_int, default=DEFAULT_SPECULATIVE_TOKENS,
                      help="proposed tokens per verification at most (fewer where a start-up measurement of "
                           "this machine's step costs says they do not pay)")


DRAFT_METHODS = ("draft", "int8", "int4")  # --speculative choices that load a draft model
SELF_DRAFTS = ("int8", "int4")  # of those, the served checkpoint itself quantized: it shares the served KV pool


def speculation_config(a: argparse.Namespace) -> SpeculationConfig | None:
    method = getattr(a, "speculative", None)
    if (method == "draft") != bool(getattr(a, "draft_ckpt_dir", None)):
        raise ConfigError("--speculative draft and --draft_ckpt_dir go together: give both or neither")
    if not method:
        return None
    return SpeculationConfig(method, a.num_speculative_tokens)


def load_draft(a: argparse.Namespace, info: DistInfo, dtype: torch.dtype | None) -> Transformer | None:
    """The draft model of --speculative draft / int8 / int4, or None. Loaded before the served
    model, so that a KV pool sized from the free memory (--kv_cache_memory) is measured with the
    draft's weights in; its own pool is one sequence until attach_draft_cache gives it the served
    model's pool (a self-draft) or one of as many blocks (a draft checkpoint: it is read through the
    same block tables). Engine checks that it shares the served model's vocabulary and KV layout."""
    method = getattr(a, "speculative", None)
    if method not in DRAFT_METHODS:
        return None
    folder = draft_folder(a)
    try:
        return load_model(folder, info, dtype, a.max_seq_len, a.max_batch_size, progress=False,
                          quantize=None if method == "draft" else method, kv_cache_tokens=a.max_seq_len)
    except torch.OutOfMemoryError:
        raise ConfigError(f"rank {info.rank} ran out of {info.device.type} memory loading the draft model "
                          f"({folder}): use --speculative int4 or a smaller draft") from None


def draft_folder(a: argparse.Namespace) -> str:
    return a.draft_ckpt_dir if a.speculative == "draft" else a.ckpt_dir


def attach_draft_cache(draft: Transformer, model: Transformer, info: DistInfo, method: str) -> None:
    """The draft's KV pool: a self-draft (int8 / int4) reads and writes the served model's own
    (Transformer.share_cache: it attends over the served model's keys, so it never reads a prompt
    again and needs no memory of its own); a draft checkpoint gets a pool of as many blocks."""
    if method in SELF_DRAFTS:
        draft.share_cache(model)
    else:
        try:
            draft.setup_cache(model.args.max_batch_size, model.args.max_seq_len, info.device,
                              draft.layers[0].attention.cache_k.dtype, kv_tokens=model.kv_blocks * model.block_size,
                              block_size=model.block_size)
        except torch.OutOfMemoryError:
            raise ConfigError(f"rank {info.rank} ran out of {info.device.type} memory for the draft model's KV cache "
                              f"({model.kv_blocks * model.block_size} tokens, as many as the served model's): lower "
                              "--kv_cache_tokens or --kv_cache_memory") from None
    if info.device.type == "cpu":
        from ..model.native_decode import plan_for

        plan_for(draft)  # its C step's plan now, on every rank together (setup_cache or share_cache dropped it)


def draft_kv_bytes_per_token(a: argparse.Namespace, info: DistInfo, element: int) -> int:
    """One rank's bytes of the draft's KV cache per token (0 without a draft checkpoint: a
    self-draft shares the served pool): its pool holds as many tokens as the served model's, so
    each token of that pool costs this much more."""
    if getattr(a, "speculative", None) != "draft":
        return 0
    params = model_folder(draft_folder(a)) / "params.json"
    if not params.is_file():
        return 0  # load_model names what is missing
    args = ModelArgs.from_params_file(params, max_seq_len=a.max_seq_len, max_batch_size=a.max_batch_size)
    return args.kv_bytes_per_token(info.world_size, element)


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    """One spelling of --quantize for every command that loads a model (generate, the server, eval, bench)."""
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="quantize linear weights at load (round-to-nearest); a checkpoint written by "
                        "python -m llama_demo.quantize needs no flag")


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    x = float(text)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return x


def kv_cache_tokens(a: argparse.Namespace) -> int | None:
    """The KV pool's size in tokens from the flags; None when it is measured in memory at load."""
    if getattr(a, "kv_cache_memory", None):
        return None
    tokens = getattr(a, "kv_cache_tokens", None) or DEFAULT_KV_ROWS * a.max_seq_len
    if tokens < a.max_seq_len:
        raise ConfigError(f"--kv_cache_tokens {tokens} cannot hold one sequence of --max_seq_len {a.max_seq_len}: "
                          "raise it or lower --max_seq_len")
    return tokens


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (a flag's error names the value otherwise)."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def build_engine(a: argparse.Namespace, dist_timeout: float = DEFAULT_DIST_TIMEOUT) -> tuple[Engine, Tokenizer]:
    """Tokenizer, process group, this rank's model slice, engine: the shared start-up of every entry point."""
    speculation = speculation_config(a)  # its flags checked before anything loads
    tokenizer = load_tokenizer(find_tokenizer(a.ckpt_dir, a.tokenizer_path))
    info = init_distributed(dist_timeout, a.device)
    dtype = parse_dtype(a.dtype)
    check_dtype(dtype, info.device)
    check_kv_cache_fits(a, info, dtype)
    if info.device.type == "cpu":
        from ..model.cpu_kernels import native

        native()  # build (or load) the C kernels now: a compiler's failure is said at start-up, not at a first request
    draft = load_draft(a, info, dtype)
    try:
        model = load_model(a.ckpt_dir, info, dtype, a.max_seq_len, a.max_batch_size, quantize=a.quantize,
                           kv_cache_tokens=kv_cache_tokens(a), kv_cache_memory=getattr(a, "kv_cache_memory", None),
                           kv_extra_bytes_per_token=draft_kv_bytes_per_token(a, info, kv_element_size(dtype, info)))
    except torch.OutOfMemoryError:
        raise ConfigError(f"rank {info.rank} ran out of {info.device.type} memory loading the model and its KV cache "
                          f"({kv_cache_tokens(a) or 'a fraction of the free memory in'} tokens"
                          f"{', beside the draft model' if draft is not None else ''}): lower --kv_cache_tokens "
                          "or --kv_cache_memory, use --quantize, or more ranks") from None
    if draft is not None:
        attach_draft_cache(draft, model, info, a.speculative)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.args.vocab_size}: wrong tokenizer for {a.ckpt_dir}?")
    engine = Engine(model, tokenizer, info.rank, info.world_size, info.device, seed=getattr(a, "seed", None),
                    step_tokens=a.step_tokens, prefix_cache=not a.no_prefix_cache, speculation=speculation,
                    draft=draft)
    if a.step_tokens is None:
        engine.calibrate()
    engine.calibrate_speculation()
    return engine, tokenizer


def check_kv_cache_fits(a: argparse.Namespace, info: DistInfo, dtype: torch.dtype | None) -> None:
    """Refuse at start-up, with the flags to lower, a KV cache that cannot fit in free memory
    (it is allocated whole, up front). Weights are loaded after this check: with them the job can
    still run short, which load_model's out-of-memory error then reports. A pool sized with
    --kv_cache_memory is sized from the free memory itself (at load)."""
    params = model_folder(a.ckpt_dir) / "params.json"
    tokens = kv_cache_tokens(a)
    if not params.is_file() or tokens is None:
        return  # load_model names what is missing
    args = ModelArgs.from_params_file(params, max_seq_len=a.max_seq_len, max_batch_size=a.max_batch_size)
    element = kv_element_size(dtype, info)
    per_token = args.kv_bytes_per_token(info.world_size, element) + draft_kv_bytes_per_token(a, info, element)
    need, free = tokens * per_token, free_memory(info.device)
    if free and need > free:
        drafted = " and the draft model's pool of as many" if getattr(a, "speculative", None) == "draft" else ""
        raise ConfigError(
            f"the KV cache needs {need / 2**30:.1f} GiB on rank {info.rank} ({tokens} tokens{drafted}) but only "
            f"{free / 2**30:.1f} GiB of {info.device.type} memory is free: lower --kv_cache_tokens (default "
            f"{DEFAULT_KV_ROWS} x --max_seq_len) or --max_seq_len, size it with --kv_cache_memory, or use more ranks")


def kv_element_size(dtype: torch.dtype | None, info: DistInfo) -> int:
    """Bytes of one KV cache element: the compute dtype's (float32 on CPU, half on CUDA by default)."""
    return torch.finfo(dtype).bits // 8 if dtype is not None else 4 if info.device.type == "cpu" else 2


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
        say_after_torchrun(f"error: {e}")
        return 2
    finally:
        shutdown_distributed()


def say_after_torchrun(line: str, wait_s: float = 600) -> None:
    """Under torchrun, write `line` to stderr again once torchrun has exited: its report of the
    failed ranks (~30 lines of traceback) would otherwise be the last thing the user reads. The
    first rank of the job to fail says it (a marker file elects it: torchrun may kill rank 0 when
    another rank fails first), from a child in its own session (torchrun kills each rank's
    process group) that waits for torchrun, the rank's parent, to exit."""
    torchrun, run_id = os.getppid(), os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None or torchrun <= 1:
        return
    marker = Path(tempfile.gettempdir()) / f"llama_demo-reason-{torchrun}-{run_id}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError:
        return  # another rank says it
    try:
        pid = os.fork()
    except OSError:  # torchrun's report stays last
        marker.unlink(missing_ok=True)
        return
    if pid:
        return
    try:  # the child: plain os calls only (the rank had threads when it forked)
        os.setsid()
        os.closerange(0, 2)
        os.closerange(3, 1 << 16)  # the rank's sockets close when it exits, not when we do
        _wait_for_exit(torchrun, wait_s)
        os.write(2, (line + "\n").encode())
    finally:
        try:
            os.unlink(marker)
        finally:
            os._exit(0)


def _wait_for_exit(pid: int, timeout_s: float) -> None:
    try:
        fd = os.pidfd_open(pid)  # readable once the process has exited
    except ProcessLookupError:
        return
    except OSError:  # no pidfd (Linux before 5.3): poll
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        return
    select.select([fd], [], [], timeout_s)


