"""Shared test fixtures: random-weight checkpoints in Meta's layout, a tiny tokenizer, the
Hugging Face reference model on the same weights, and a bounded torchrun launcher."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
LLAMA2_TOKENIZER = SHARED / "llama2-tokenizer.model"
sys.path.insert(0, str(ROOT))

from llama_demo.weights.checkpoint import expected_shapes, save_sharded  # noqa: E402
from llama_demo.config import ModelArgs  # noqa: E402
from llama_demo.model import cpu_kernels  # noqa: E402

# Tests of the C kernels (qkernels.c) carry NATIVE: skipped only where the kernels are not to be
# built (no compiler, LLAMA_DEMO_NATIVE_KERNELS=0); where a compiler fails on them, they fail with
# its error line, and so does the run as a whole: a broken build must not pass as a skip.
NATIVE = pytest.mark.native_kernels


def pytest_configure(config):
    config.addinivalue_line("markers", "native_kernels: needs the C kernels of model/qkernels.c")


def pytest_runtest_setup(item):
    if item.get_closest_marker("native_kernels") and cpu_kernels.native() is None:
        if cpu_kernels.native_failure():
            pytest.fail(f"qkernels.c did not build: {cpu_kernels.native_failure()}", pytrace=False)
        pytest.skip("the C kernels are off here (no C compiler, or LLAMA_DEMO_NATIVE_KERNELS=0)")


def pytest_sessionfinish(session, exitstatus):
    if cpu_kernels.native_failure() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED  # even when no selected test needed them

# Small shapes the tests share: multi-head, grouped-query (with a non-trivial FFN multiplier and
# Llama 3's rope theta), and a single KV head (replicated when there are more ranks).
SHAPES = {
    "mha": dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-5),
    "gqa": dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, multiple_of=16, ffn_dim_multiplier=1.3,
                rope_theta=500000.0, norm_eps=1e-6),
    "mqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, multiple_of=32),
}
# Llama 3.1's layout: gqa's, with its long-context rotary scaling (params.json's use_scaled_rope)
SHAPES["llama31"] = dict(SHAPES["gqa"], use_scaled_rope=True)
TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. Once upon a time there was a little llama who "
    "lived in the mountains. Café, naïve, résumé; 東京 and 北京; emoji 🦙🚀. def main(): return 42\n"
) * 4


def make_tokenizer(folder: Path, vocab_size: int = 400) -> None:
    """A small byte-level BPE tokenizer.json (no EOS: random models then run to max_new_tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TOKENIZER_TEXT], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "add_bos_token": True}))


def random_state(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(args).items():
        if len(shape) == 1:  # norms: around 1, not exactly 1, so a wrong norm shows up
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[name] = torch.randn(shape, generator=g) * (0.5 if "tok_embeddings" in name else 0.08)
    return state


def make_checkpoint(folder: Path, shape: str = "mha", n_shards: int = 1, seed: int = 0, vocab_size: int = 400,
                    dtype: torch.dtype = torch.float32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder, vocab_size)
    args = ModelArgs(**SHAPES[shape], vocab_size=vocab_size)
    state = {k: v.to(dtype) for k, v in random_state(args, seed).items()}
    save_sharded(state, args, folder, n_shards)
    return folder


def hf_model(ckpt_dir: Path):
    """transformers' LlamaForCausalLM on the same weights, wq/wk permuted to its rotary layout."""
    from llama_demo.weights.hf import hf_model_from_meta

    return hf_model_from_meta(ckpt_dir, torch.float32, torch.device("cpu"))


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("RANK", None)
    return env


def torchrun(nproc: int, args: list[str], timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc_per_node nproc <args>` from the repo root with a bounded wait."""
    from llama_demo.model.parallel import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def python_module(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Random checkpoints shared by the engine tests: {shape}-{shards}."""
    base = tmp_path_factory.mktemp("ckpts")
    out = {}
    for shape, shards in [("mha", 1), ("mha", 2), ("gqa", 1), ("gqa", 2), ("mqa", 1), ("llama31", 2)]:
        seed = {"mha": 1, "gqa": 2, "mqa": 3, "llama31": 4}[shape]
        out[f"{shape}-{shards}"] = make_checkpoint(base / f"{shape}-{shards}", shape, shards, seed=seed)
    return out


@pytest.fixture(scope="session")
def family_server(request, tmp_path_factory):
    """A 2-rank server of one family's folder (tests/families.py), parametrized indirectly by the
    family's name. Session-scoped: pytest groups the tests by family across modules, so each
    family's server starts once and stops before the next one starts."""
    from families import family_server as start

    s = start(request.param, tmp_path_factory.mktemp(f"server-{request.param}"))
    try:
        yield s
    finally:
        s.stop()
