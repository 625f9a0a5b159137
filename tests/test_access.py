"""Access and limits without a model: API keys in OpenAI's 401 shape, secrets from the
environment or a file, start-up warnings, a busy server on the chat page, KV-cache sizing."""
from __future__ import annotations

import argparse

import httpx
import openai
import pytest
import torch

from conftest import make_checkpoint, make_tokenizer, python_module
from fakes import FakeClient, ServerThread, chat_format
from llama_demo.config import ConfigError, ModelArgs, ServerConfig
from llama_demo.model.parallel import DistInfo, free_port
from llama_demo.serve.auth import exposure_warnings, parse_login, read_secret
from llama_demo.serve.app import build_app
from llama_demo.serve.ui import WARNING
from llama_demo.text.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder)
    return load_tokenizer(folder)


def test_api_key_is_an_openai_bearer_token(tok):
    client = FakeClient(tok)
    with ServerThread(build_app(client, chat_format(tok), ServerConfig(api_key="sk-test", auth=("u", "p"))),
                      free_port()) as s:
        r = httpx.get(f"{s.url}/v1/models")
        assert r.status_code == 401
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and "Bearer" in err["message"]
        # with an API key, the page login is not an API credential
        assert httpx.get(f"{s.url}/v1/models", headers={"Authorization": "Bearer u:p"}).status_code == 401
        assert httpx.get(f"{s.url}/v1/models", auth=("u", "p")).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="sk-wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{s.url}/v1", api_key="sk-test", max_retries=0)
        assert good.completions.create(model="m", prompt="llama", max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(f"{s.url}/config").status_code == 401  # the page still wants its login


def test_secrets_come_from_the_environment_or_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_DEMO_API_KEY", "from-env")
    assert read_secret(None, "LLAMA_DEMO_API_KEY") == "from-env"
    assert read_secret("flag", "LLAMA_DEMO_API_KEY") == "flag"
    (tmp_path / "key").write_text("from-file\n")
    assert read_secret(f"@{tmp_path / 'key'}", "LLAMA_DEMO_API_KEY") == "from-file"
    with pytest.raises(ConfigError, match="cannot read"):
        read_secret(f"@{tmp_path / 'missing'}", "X")
    assert parse_login("alice:s3:cret") == ("alice", "s3:cret")
    for bad in ("alice", ":pw", "alice:"):
        with pytest.raises(ConfigError, match="USER:PASS"):
            parse_login(bad)


def test_exposure_warnings():
    assert exposure_warnings("127.0.0.1", False, None, None) == []
    assert exposure_warnings("::1", False, None, None) == []
    assert len(exposure_warnings("0.0.0.0", False, None, None)) == 2
    assert len(exposure_warnings("0.0.0.0", False, ("u", "p"), None)) == 0
    assert exposure_warnings("0.0.0.0", False, None, "key")[0].startswith("serving on 0.0.0.0")
    assert "--share" in exposure_warnings("127.0.0.1", True, None, "key")[0]


def test_a_busy_server_says_so_on_the_page_and_in_the_api(tok):
    from gradio_client import Client

    client = FakeClient(tok, capacity=1)
    client.in_flight = 1  # one request holds the only place: the queue is full
    with ServerThread(build_app(client, chat_format(tok), ServerConfig()), free_port()) as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 429 and r.headers["retry-after"].isdigit()
        page = Client(f"{s.url}/", verbose=False)
        try:
            answer, _ = page.predict("hi", "", 0.0, 1.0, 8, api_name="/chat")
        finally:
            page.close()
    assert answer.startswith(WARNING) and "busy" in answer


def test_a_kv_cache_larger_than_free_memory_is_refused_at_start_up(tmp_path):
    folder = make_checkpoint(tmp_path / "m", "mha", 1)
    proc = python_module(["llama_demo.generate", "--ckpt_dir", str(folder), "--prompt", "hi",
                          "--max_seq_len", str(10**9)])
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "KV cache needs" in line and "--kv_cache_tokens" in line and "--max_seq_len" in line


def test_kv_cache_check_counts_this_ranks_heads(tmp_path, monkeypatch):
    from llama_demo.commands import startup

    folder = make_checkpoint(tmp_path / "m", "gqa", 1)  # 2 KV heads of 16, 3 layers
    a = argparse.Namespace(ckpt_dir=str(folder), max_seq_len=1000, max_batch_size=4, kv_cache_tokens=4000,
                           kv_cache_memory=None, speculative=None)
    need = 2 * 3 * 4000 * 2 * 16 * 4  # k and v, layers, tokens, KV heads, head dim, float32
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    monkeypatch.setattr(startup, "free_memory", lambda device: need)
    startup.check_kv_cache_fits(a, info, torch.float32)  # fits exactly
    monkeypatch.setattr(startup, "free_memory", lambda device: need - 1)
    with pytest.raises(ConfigError, match="KV cache needs"):
        startup.check_kv_cache_fits(a, info, torch.float32)
    # two ranks hold one KV head each: half the bytes
    startup.check_kv_cache_fits(a, DistInfo(0, 2, 0, torch.device("cpu")), torch.float32)
    # a self-draft (the model's own weights quantized) shares the served pool: no more bytes
    a.speculative = "int8"
    monkeypatch.setattr(startup, "free_memory", lambda device: need)
    startup.check_kv_cache_fits(a, info, torch.float32)
    monkeypatch.setattr(startup, "free_memory", lambda device: need - 1)
    with pytest.raises(ConfigError, match=r"KV cache needs .* \(4000 tokens\) but"):
        startup.check_kv_cache_fits(a, info, torch.float32)
    # a draft checkpoint of its own: its shape counts (mha: more KV heads than gqa's)
    a.speculative, a.draft_ckpt_dir = "draft", str(make_checkpoint(tmp_path / "d", "mha", 1))
    draft = ModelArgs.from_params_file(tmp_path / "d" / "params.json", max_seq_len=1000, max_batch_size=4)
    both = need + 4000 * draft.kv_bytes_per_token(1, 4)
    assert both > 2 * need
    monkeypatch.setattr(startup, "free_memory", lambda device: both - 1)
    with pytest.raises(ConfigError, match=r"KV cache needs .* tokens and the draft model's pool of as many\)"):
        startup.check_kv_cache_fits(a, info, torch.float32)
    monkeypatch.setattr(startup, "free_memory", lambda device: both)
    startup.check_kv_cache_fits(a, info, torch.float32)


def test_a_kv_pool_sized_in_memory_leaves_room_for_the_drafts(tmp_path, monkeypatch):
    """--kv_cache_memory with a draft: a draft checkpoint's pool (as many tokens) shares the
    fraction (kv_tokens_in_memory's extra bytes); --speculative int8 shares the served pool, its
    weights in before the pool is measured; the answer is plain greedy's."""
    from types import SimpleNamespace

    from llama_demo.weights import loading

    folder = make_checkpoint(tmp_path / "m", "gqa", 1)
    args = ModelArgs.from_params_file(folder / "params.json", max_seq_len=256, max_batch_size=4)
    own = args.kv_bytes_per_token(1, 4)
    monkeypatch.setattr(loading, "free_memory", lambda device: 2000 * own)
    model, info = SimpleNamespace(args=args), DistInfo(0, 1, 0, torch.device("cpu"))
    assert loading.kv_tokens_in_memory(model, info, torch.float32, 0.5) == 1000
    assert loading.kv_tokens_in_memory(model, info, torch.float32, 0.5, extra_bytes_per_token=own) == 500
    monkeypatch.undo()
    common = ["llama_demo.generate", "--ckpt_dir", str(folder), "--prompt", "The quick brown fox",
              "--max_new_tokens", "8", "--temperature", "0", "--max_seq_len", "256", "--kv_cache_memory", "0.02"]
    plain = python_module(common)
    drafted = python_module(common + ["--speculative", "int8"])
    assert plain.returncode == 0 and drafted.returncode == 0, plain.stderr + drafted.stderr
    assert drafted.stdout == plain.stdout and plain.stdout.strip()


def test_kv_cache_flags():
    """--kv_cache_tokens must hold one whole sequence; the default is the memory of 8 sequences of
    --max_seq_len; --kv_cache_memory leaves the size to load time (measured in free memory)."""
    from llama_demo.commands import startup

    ns = lambda **kw: argparse.Namespace(**{"max_seq_len": 512, "kv_cache_tokens": None, "kv_cache_memory": None, **kw})  # noqa: E731
    assert startup.kv_cache_tokens(ns()) == 8 * 512
    assert startup.kv_cache_tokens(ns(kv_cache_tokens=600)) == 600
    assert startup.kv_cache_tokens(ns(kv_cache_memory=0.5)) is None
    with pytest.raises(ConfigError, match="cannot hold one sequence of --max_seq_len 512"):
        startup.kv_cache_tokens(ns(kv_cache_tokens=100))
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(argparse.ArgumentTypeError):
            startup.fraction(bad)
