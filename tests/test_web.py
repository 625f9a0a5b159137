"""The web layer over a fake engine: OpenAI routes (through the official client), health, auth,
disconnects, and the Gradio chat endpoint through gradio_client. No model, no process group."""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from conftest import make_tokenizer
from fakes import FakeClient, ServerThread, chat_format, expected_text
from llama_demo.text.chat_format import Message
from llama_demo.config import ServerConfig
from llama_demo.model.parallel import free_port
from llama_demo.text.tokenizer import load_tokenizer
from llama_demo.serve.errors import ApiError
from llama_demo.serve.app import build_app
from llama_demo.serve.ui import WARNING, ShareError, open_share_tunnel, page_dialog

SEQ = 256
AUTH = ("alice", "s3cret")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder)
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def chat(tok):
    """A chat-mode server without auth: (fake client, its chat format, server)."""
    client, fmt = FakeClient(tok, max_seq_len=SEQ), chat_format(tok)
    with ServerThread(build_app(client, fmt, ServerConfig(), "Be brief."), free_port()) as s:
        yield client, fmt, s


@pytest.fixture(scope="module")
def plain(tok):
    """A completion-mode server (no chat format) that requires USER:PASS."""
    client = FakeClient(tok, max_seq_len=SEQ)
    with ServerThread(build_app(client, None, ServerConfig(auth=AUTH)), free_port()) as s:
        yield client, s


@pytest.fixture(autouse=True)
def reset_fakes(request):
    yield
    for name in ("chat", "plain"):
        if name in request.fixturenames:
            fake = request.getfixturevalue(name)[0]
            fake.delay, fake.refuse = 0.0, None


def oai(server: ServerThread, key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=10)


# --- health and models ----------------------------------------------------------------------------


def test_health_is_ok_while_serving_and_503_with_the_reason_after(chat):
    client, _, s = chat
    r = httpx.get(f"{s.url}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "running": 0, "waiting": 0}
    client.health.error = "rank 1 lost"
    try:
        r = httpx.get(f"{s.url}/health")
        assert r.status_code == 503 and "rank 1 lost" in r.json()["reason"]
    finally:
        client.health.error = None


def test_models_lists_the_served_model(chat):
    models = oai(chat[2]).models.list().data
    assert [m.id for m in models] == ["fake-llama"]


# --- completions ----------------------------------------------------------------------------------


def test_completion_returns_the_continuation_with_usage(chat, tok):
    client, _, s = chat
    prompt = "The quick brown fox"
    out = oai(s).completions.create(model="fake-llama", prompt=prompt, max_tokens=7, temperature=0)
    ids = tok.encode(prompt)
    assert out.choices[0].text == expected_text(tok, ids, 7, SEQ)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (len(ids), 7, len(ids) + 7)
    assert client.requests[-1][0] == ids  # plain text with the tokenizer's BOS rule
    assert ids[0] == tok.bos_id


def test_completion_defaults_are_openais(chat):
    client, _, s = chat
    httpx.post(f"{s.url}/v1/completions", json={"prompt": "llama"}).raise_for_status()
    params = client.requests[-1][1]
    assert (params.temperature, params.top_p, params.max_new_tokens) == (1.0, 1.0, 16)


def test_completion_stream_adds_up_to_the_same_text(chat, tok):
    s = chat[2]
    prompt = "Once upon a time"
    chunks = list(oai(s).completions.create(model="m", prompt=[prompt], max_tokens=20, stream=True, stop=["zzz"]))
    assert len(chunks) > 3
    assert "".join(c.choices[0].text for c in chunks) == expected_text(tok, tok.encode(prompt), 20, SEQ)
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert chat[0].requests[-1][1].stop == ["zzz"]


def test_max_tokens_beyond_the_context_is_clipped_to_fit(chat, tok):
    prompt = "the lazy dog " * 40
    n_prompt = len(tok.encode(prompt))
    assert n_prompt < SEQ
    out = oai(chat[2]).completions.create(model="m", prompt=prompt, max_tokens=5000)
    assert out.usage.completion_tokens == SEQ - n_prompt and out.choices[0].finish_reason == "length"


# --- chat completions -----------------------------------------------------------------------------


def test_chat_completion_encodes_the_dialog_in_the_chat_format(chat, tok):
    client, fmt, s = chat
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi llama"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you"}]
    out = oai(s).chat.completions.create(model="m", messages=messages, max_tokens=9)
    ids = fmt.encode_dialog([Message(m["role"], m["content"]) for m in messages])
    assert client.requests[-1][0] == ids
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected_text(tok, ids, 9, SEQ)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 9


def test_chat_default_max_tokens_is_what_fits(chat):
    client, fmt, s = chat
    r = httpx.post(f"{s.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    r.raise_for_status()
    ids, params = client.requests[-1]
    assert params.max_new_tokens == min(512, SEQ - len(ids))


def test_chat_stream_sends_role_then_deltas_then_usage(chat, tok):
    _, fmt, s = chat
    stream = oai(s).chat.completions.create(model="m", messages=[{"role": "user", "content": "tell me a story"}],
                                            max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    ids = fmt.encode_dialog([Message("user", "tell me a story")])
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(tok, ids, 12, SEQ)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_raw_stream_is_sse_ending_in_done(chat):
    with httpx.stream("POST", f"{chat[2].url}/v1/completions", json={"prompt": "llama", "max_tokens": 3,
                                                                     "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


# --- bad requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path, body, param, words", [
    ("completions", {"prompt": "the lazy dog " * 200}, "prompt", "context"),
    ("completions", {"prompt": "x", "temperature": -1}, "temperature", "temperature must be >= 0"),
    ("completions", {"prompt": "x", "top_p": 2}, "top_p", "top_p must be in (0, 1]"),
    ("completions", {"prompt": "x", "n": 0}, "n", "n must be an integer >= 1"),
    ("completions", {"prompt": "x", "suffix": "end"}, "suffix", "suffix is not supported"),
    ("completions", {"prompt": "x", "wizardry": 1}, "wizardry", "Extra inputs are not permitted"),
    ("completions", {"prompt": "x", "logit_bias": {"999": 1}}, "logit_bias", "outside the vocabulary"),
    ("completions", {"prompt": "x", "logprobs": 21}, "logprobs", "logprobs must be an integer in [0, 20]"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "top_logprobs",
     "needs logprobs: true"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 30},
     "top_logprobs", "top_logprobs must be an integer in [0, 20]"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": {"function": {"name": "g"}},
                          "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tool_choice", "one of the tools"),
    ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens must be an integer >= 1"),
    ("completions", {"prompt": "x", "temperature": "hot"}, "temperature", "valid number"),
    ("completions", {}, "prompt", "Field required"),
    ("chat/completions", {"messages": []}, "messages", "empty dialog"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages", "unknown role 'wizard'"),
    ("chat/completions", {"messages": [{"role": "user", "content": "a"}], "parallel_tool_calls": "yes"},
     "parallel_tool_calls", "parallel_tool_calls"),
    ("chat/completions", {"messages": [{"role": "user", "content": "the lazy dog " * 200}]}, "messages", "context"),
])
def test_bad_requests_are_400_saying_what_is_wrong(chat, path, body, param, words):
    r = httpx.post(f"{chat[2].url}/v1/{path}", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == param
    assert err["type"] == "invalid_request_error" and err["code"] is None


def test_openai_client_sees_a_bad_request_error(chat):
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        oai(chat[2]).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], temperature=-1)


def test_prompt_ids_outside_the_vocabulary_are_a_400_before_anything_runs(chat):
    client, _, s = chat
    before = len(client.requests)
    for stream in (False, True):
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": [1, 999], "stream": stream})
        assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "prompt"
    assert len(client.requests) == before  # the gate refused it: nothing was submitted


def test_a_request_failing_inside_the_engine_is_a_500_or_an_error_event(chat):
    client, _, s = chat
    client.refuse = "sampling failed: boom"
    r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "x"})
    assert r.status_code == 500 and "sampling failed: boom" in r.json()["error"]["message"]
    with httpx.stream("POST", f"{s.url}/v1/completions", json={"prompt": "x", "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    assert "sampling failed: boom" in json.loads(lines[-2][6:])["error"]["message"]


def test_chat_route_on_a_server_without_chat_format_is_400(plain):
    r = httpx.post(f"{plain[1].url}/v1/chat/completions", auth=AUTH,
                   json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "/v1/completions" in r.json()["error"]["message"]


# --- disconnects ----------------------------------------------------------------------------------


def test_client_leaving_mid_stream_cancels_the_generation(chat):
    client, _, s = chat
    client.delay, client.cancel_event = 0.02, threading.Event()
    with httpx.stream("POST", f"{s.url}/v1/completions", timeout=10,
                      json={"prompt": "llama", "max_tokens": 1000, "stream": True}) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break  # leaving the block closes the connection
    left = time.monotonic()
    assert client.cancel_event.wait(5), "the engine request was not cancelled"
    assert time.monotonic() - left < 5 and client.requests[-1][1].max_new_tokens > 100


def test_client_leaving_a_plain_request_cancels_it(chat):
    client, _, s = chat
    client.delay, client.cancel_event = 0.02, threading.Event()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{s.url}/v1/completions", json={"prompt": "llama", "max_tokens": 1000}, timeout=0.5)
    assert client.cancel_event.wait(5), "the engine request was not cancelled"


# --- auth -----------------------------------------------------------------------------------------


def test_api_needs_credentials_when_auth_is_set(plain):
    url = f"{plain[1].url}/v1/models"
    r = httpx.get(url)
    assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
    assert httpx.get(url, headers={"Authorization": "Bearer alice:wrong"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer alice:s3cret"}).status_code == 200
    assert httpx.get(url, auth=AUTH).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        oai(plain[1], key="nope").models.list()
    out = oai(plain[1], key="alice:s3cret").completions.create(model="m", prompt="llama", max_tokens=2)
    assert out.usage.completion_tokens == 2


def test_ui_needs_a_login_when_auth_is_set(plain, tok):
    from gradio_client import Client

    url = plain[1].url
    assert httpx.get(f"{url}/config").status_code == 401
    client = Client(f"{url}/", auth=AUTH, verbose=False)
    try:  # completion mode: the message is completed as plain text
        answer, stats = client.predict("Once upon", "", 0.0, 1.0, 6, api_name="/chat")
    finally:
        client.close()
    assert answer == expected_text(tok, tok.encode("Once upon"), 6, SEQ)
    assert "tokens/s" in stats


def test_api_is_open_without_auth(chat):
    assert httpx.get(f"{chat[2].url}/v1/models").status_code == 200


# --- the Gradio chat endpoint ---------------------------------------------------------------------


def test_gradio_client_chat_returns_the_streamed_answer(chat, tok):
    from gradio_client import Client

    _, fmt, s = chat
    client = Client(f"{s.url}/", verbose=False)
    try:
        answer, stats = client.predict("hi llama", "Be brief.", 0.0, 1.0, 8, api_name="/chat")
        empty, _ = client.predict("   ", "Be brief.", 0.0, 1.0, 8, api_name="/chat")
    finally:
        client.close()
    ids = fmt.encode_dialog([Message("system", "Be brief."), Message("user", "hi llama")])
    assert answer == expected_text(tok, ids, 8, SEQ)
    assert "8 tokens" in stats and "tokens/s" in stats
    assert empty.startswith(WARNING) and "empty" in empty


def test_ui_history_becomes_the_dialog_skipping_failed_turns():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "first"}]},  # Gradio 6 content parts
        {"role": "assistant", "content": [{"type": "text", "text": "answer one"}]},
        {"role": "user", "content": "too long"},
        {"role": "assistant", "content": f"{WARNING} the prompt is 9999 tokens"},
        {"role": "user", "content": "stopped before any text"},
    ]
    assert page_dialog("second", history, "sys") == [Message("system", "sys"), Message("user", "first"),
                                                     Message("assistant", "answer one"), Message("user", "second")]
    with pytest.raises(ApiError, match="empty"):
        page_dialog(" ", [], "")


# --- share links ----------------------------------------------------------------------------------


def test_share_without_internet_is_one_clear_line(monkeypatch):
    from gradio import networking

    def offline(*args, **kwargs):
        try:
            raise httpx.ConnectError("[Errno -2] Name or service not known")
        except httpx.ConnectError as e:
            raise RuntimeError("Could not get share link from Gradio API Server.") from e

    monkeypatch.setattr(networking, "setup_tunnel", offline)
    with pytest.raises(ShareError) as e:
        open_share_tunnel("0.0.0.0", 7860)
    msg = str(e.value)
    assert "\n" not in msg and "internet" in msg and "http://127.0.0.1:7860/" in msg


# --- logprobs, n, batches of prompts, nulls -------------------------------------------------------


def test_chat_logprobs_have_openais_shape(chat, tok):
    out = oai(chat[2]).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi llama"}],
                                               max_tokens=5, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == 5 and chat[0].requests[-1][1].logprobs == 3
    assert "".join(c.token for c in content) == out.choices[0].message.content
    first = content[0]
    assert first.logprob == -0.25 and bytes(first.bytes).decode() == first.token
    assert len(first.top_logprobs) == 3 and first.top_logprobs[0].token == first.token


def test_chat_stream_carries_logprobs_per_token(chat):
    chunks = list(oai(chat[2]).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4, logprobs=True, stream=True))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == 4 and all(e.top_logprobs == [] for e in entries)


def test_completion_echo_with_logprobs_scores_the_prompt_as_openai_does(chat, tok):
    ids = tok.encode("The quick brown fox")
    out = oai(chat[2]).completions.create(model="m", prompt=ids, max_tokens=2, echo=True, logprobs=1, temperature=0)
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(tok.decode(ids))
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 2
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert lp.token_logprobs[1:] == [-0.25] * (len(ids) + 1)
    assert all(max(top.values()) == t for top, t in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] < len(choice.text)
    params = chat[0].requests[-1][1]
    assert (params.logprobs, params.prompt_logprobs) == (1, 1)


def test_completion_logprobs_stream_as_openai_does(chat, tok):
    chunks = list(oai(chat[2]).completions.create(model="m", prompt="llama", max_tokens=3, logprobs=2, stream=True))
    tokens = [t for c in chunks for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
    assert len(tokens) == 3
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_a_batch_of_prompts_and_n_are_several_requests_in_one_response(chat, tok):
    client, _, s = chat
    prompts = [tok.encode("Once upon"), tok.encode("a little llama")]
    before = len(client.requests)
    out = oai(s).completions.create(model="m", prompt=prompts, max_tokens=3, n=2, seed=7)
    assert len(client.requests) - before == 4
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [expected_text(tok, prompts[i // 2], 3, SEQ) for i in range(4)]
    assert [r[1].seed for r in client.requests[before:]] == [7, 8, 7, 8]  # choice j draws from seed + j
    assert out.usage.prompt_tokens == len(prompts[0]) + len(prompts[1]) and out.usage.completion_tokens == 12
    texts = oai(s).completions.create(model="m", prompt=["Once upon", "a little llama"], max_tokens=3)
    assert [c.text for c in texts.choices] == [expected_text(tok, p, 3, SEQ) for p in prompts]


def test_chat_n_streams_every_choice_by_index(chat):
    chunks = list(oai(chat[2]).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                       max_tokens=4, n=3, stream=True))
    texts = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
    assert sorted(texts) == [0, 1, 2] and len(set(texts.values())) == 1
    assert sum(1 for c in chunks for ch in c.choices if ch.finish_reason) == 3


def test_choices_queue_all_or_nothing(chat):
    client, _, s = chat
    client.capacity, before = 3, len(client.requests)
    try:
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "x", "n": 2, "max_tokens": 2, "stream": True,
                                                        "stream_options": None})
        assert r.status_code == 200
        client.delay = 0.05
        with httpx.stream("POST", f"{s.url}/v1/completions", json={"prompt": "x", "n": 2, "max_tokens": 40,
                                                                   "stream": True}) as held:
            lines = held.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)
            r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "x", "n": 2})
            assert r.status_code == 429 and r.headers["retry-after"]
    finally:
        client.capacity, client.delay = 1000, 0.0
    assert len(client.requests) == before + 4  # the refused pair published nothing


def test_explicit_nulls_mean_the_defaults(chat):
    client, _, s = chat
    body = {"prompt": "llama", "stream": None, "n": None, "temperature": None, "top_p": None, "max_tokens": None,
            "stop": None, "seed": None, "presence_penalty": None, "frequency_penalty": None, "logit_bias": None,
            "logprobs": None, "echo": None, "best_of": None, "suffix": None, "user": None, "stream_options": None}
    r = httpx.post(f"{s.url}/v1/completions", json=body)
    assert r.status_code == 200, r.text
    params = client.requests[-1][1]
    assert (params.temperature, params.top_p, params.max_new_tokens, params.logprobs) == (1.0, 1.0, 16, None)


def test_sampling_fields_reach_the_engine(chat):
    client, _, s = chat
    oai(s).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                   presence_penalty=0.5, frequency_penalty=-0.5, logit_bias={"5": -100, "7": 3},
                                   extra_body={"min_p": 0.1, "top_k": 4, "repetition_penalty": 1.1})
    p = client.requests[-1][1]
    assert (p.presence_penalty, p.frequency_penalty, p.min_p, p.top_k, p.repetition_penalty) == (0.5, -0.5, 0.1, 4, 1.1)
    assert p.logit_bias == [[5, -100.0], [7, 3.0]]


# --- operations: tokenize, metrics, CORS, keep-alive ----------------------------------------------


def test_tokenize_and_detokenize_in_vllms_shapes(chat, tok):
    _, fmt, s = chat
    r = httpx.post(f"{s.url}/tokenize", json={"prompt": "The quick brown fox"})
    assert r.json() == {"tokens": tok.encode("The quick brown fox"), "count": len(tok.encode("The quick brown fox")),
                        "max_model_len": SEQ}
    no_bos = httpx.post(f"{s.url}/tokenize", json={"prompt": "fox", "add_special_tokens": False}).json()["tokens"]
    assert no_bos == tok.encode("fox", bos=False)
    dialog = httpx.post(f"{s.url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert dialog["tokens"] == fmt.encode_dialog([Message("user", "hi")])
    assert httpx.post(f"{s.url}/detokenize", json={"tokens": tok.encode("the lazy dog")}).json() == {
        "prompt": "the lazy dog"}
    bad = httpx.post(f"{s.url}/detokenize", json={"tokens": [99999]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_metrics_count_requests_tokens_and_latencies(chat):
    s = chat[2]
    before = httpx.get(f"{s.url}/metrics").text
    oai(s).completions.create(model="m", prompt="llama", max_tokens=3)
    httpx.post(f"{s.url}/v1/completions", json={"prompt": "x", "temperature": -1})
    text = httpx.get(f"{s.url}/metrics").text

    def value(body: str, name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(name + " ")
                   or line.startswith(name + "{"))

    assert value(text, "llama_demo_generation_tokens_total") - value(before, "llama_demo_generation_tokens_total") == 3
    assert 'llama_demo_requests_total{endpoint="/v1/completions",outcome="length"}' in text
    assert 'llama_demo_requests_total{endpoint="/v1/completions",outcome="400"}' in text
    for name in ("llama_demo_time_to_first_token_seconds_count", "llama_demo_inter_token_latency_seconds_count",
                 "llama_demo_requests_waiting", "llama_demo_requests_running", "llama_demo_prompt_tokens_total"):
        assert name in text


def test_cors_is_off_by_default_and_on_for_named_origins(tok, chat):
    origin = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(f"{chat[2].url}/v1/completions", headers=origin)
    assert "access-control-allow-origin" not in r.headers
    client = FakeClient(tok, max_seq_len=SEQ)
    with ServerThread(build_app(client, None, ServerConfig(cors_origins=["https://app.example"])), free_port()) as s:
        r = httpx.options(f"{s.url}/v1/completions", headers=origin)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(f"{s.url}/v1/completions", headers={**origin, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_a_waiting_stream_gets_keep_alive_comments(tok):
    client = FakeClient(tok, max_seq_len=SEQ, delay=0.6)
    with ServerThread(build_app(client, None, ServerConfig(sse_keepalive_s=0.2)), free_port()) as s:
        with httpx.stream("POST", f"{s.url}/v1/completions", json={"prompt": "x", "max_tokens": 1,
                                                                   "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
    assert lines[0] == ": keep-alive" and lines[-1] == "data: [DONE]"
    created = {json.loads(line[6:])["created"] for line in lines if line.startswith("data: {")}
    assert len(created) == 1


# --- every OpenAI request field is honoured or refused ---------------------------------------------


def _openai_fields(module) -> list[str]:
    import typing

    return sorted(typing.get_type_hints(module.CompletionCreateParamsBase))


# A valid value for each field we honour, and how to see that it was honoured: (value, check(params, body)).
HONOURED = {
    "model": ("another-name", lambda p, b: b["model"] == "fake-llama"),  # any name: the answer says which model
    "prompt": ("llama", lambda p, b: True),
    "messages": ([{"role": "user", "content": "hi"}], lambda p, b: True),
    "max_tokens": (3, lambda p, b: p.max_new_tokens == 3),
    "max_completion_tokens": (3, lambda p, b: p.max_new_tokens == 3),
    "temperature": (0.5, lambda p, b: p.temperature == 0.5),
    "top_p": (0.5, lambda p, b: p.top_p == 0.5),
    "n": (2, lambda p, b: len(b["choices"]) == 2),
    "seed": (5, lambda p, b: p.seed == 5),
    "stop": (["zz"], lambda p, b: p.stop == ["zz"]),
    "presence_penalty": (0.5, lambda p, b: p.presence_penalty == 0.5),
    "frequency_penalty": (0.5, lambda p, b: p.frequency_penalty == 0.5),
    "logit_bias": ({"5": 1.5}, lambda p, b: p.logit_bias == [[5, 1.5]]),
    "logprobs": (2, lambda p, b: b["choices"][0]["logprobs"] is not None),
    "top_logprobs": (2, lambda p, b: p.logprobs == 2),
    "echo": (True, lambda p, b: b["choices"][0]["text"].startswith("llama")),
}


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_every_openai_request_field_is_honoured_or_refused(chat, endpoint):
    """Walks the official client's request schema: each field is honoured (its effect checked),
    a label that cannot change an answer, or a 400 naming it; never silently ignored."""
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_params

    from llama_demo.serve import protocol as p

    client, _, s = chat
    module, path = ((completion_create_params, "completions") if endpoint == "completions"
                    else (chat_params, "chat/completions"))
    base = {"prompt": "llama", "max_tokens": 2} if endpoint == "completions" else {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    if endpoint == "chat":
        HONOURED_HERE = {**HONOURED, "logprobs": (True, lambda p, b: b["choices"][0]["logprobs"] is not None)}
    else:
        HONOURED_HERE = HONOURED
    for field in _openai_fields(module):
        value = HONOURED_HERE.get(field, ("x",))[0]
        body = {**base, field: value}
        if field == "top_logprobs":
            body["logprobs"] = True
        r = httpx.post(f"{s.url}/v1/{path}", json=body)
        if r.status_code == 400:
            assert r.json()["error"]["param"] == field, (field, r.text)
            assert field not in HONOURED_HERE, f"{field} is honoured, yet a valid value was refused: {r.text}"
            continue
        assert r.status_code == 200, (field, r.text)
        if field in HONOURED_HERE:
            assert HONOURED_HERE[field][1](client.requests[-1][1], r.json()), f"{field} was not honoured"
        else:
            assert field in p.LABELS, f"{field} was accepted, but is neither honoured nor a label"
    # the neutral values of refused fields are accepted (clients send them by default)
    neutral = {"tool_choice": "none", "response_format": {"type": "text"}, "store": False, "parallel_tool_calls": True}
    if endpoint == "chat":
        assert httpx.post(f"{s.url}/v1/{path}", json={**base, **neutral}).status_code == 200


# --- structured output ----------------------------------------------------------------------------


def test_openai_parse_with_a_pydantic_model_gets_the_schemas_grammar(tok):
    import pydantic

    class Person(pydantic.BaseModel):
        name: str
        age: int

    client = FakeClient(tok, max_seq_len=SEQ, script='{"name":"Ada","age":36}')
    with ServerThread(build_app(client, chat_format(tok), ServerConfig()), free_port()) as s:
        out = oai(s).chat.completions.parse(model="m", messages=[{"role": "user", "content": "who?"}],
                                            response_format=Person, max_tokens=40)
        assert out.choices[0].message.parsed == Person(name="Ada", age=36)
        grammar = client.requests[-1][1].grammar
        assert grammar and '"age"' in grammar  # the schema's grammar travels to the engine
        oai(s).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "json_object"}, max_tokens=40)
        assert client.requests[-1][1].grammar
        r = httpx.post(f"{s.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                              "response_format": {"type": "json_schema", "json_schema": {
                                                                  "name": "x", "schema": {"type": "nope"}}}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
        before = len(client.requests)
        r = httpx.post(f"{s.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                              "response_format": {"type": "json_schema", "json_schema": {
                                                                  "name": "x", "schema": {"$ref": "#"}}}})
        assert r.status_code == 400 and "admits no document" in r.json()["error"]["message"]
        assert len(client.requests) == before  # refused at the gate, not failed in the engine


# --- tools ----------------------------------------------------------------------------------------

TOOL_TEMPLATE = (  # Llama 3.1's way, reduced: the tools as JSON in the prompt, tool results as ipython
    "{% if tools %}Tools: {{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}ipython: {{ m.content }}\n{% elif m.tool_calls %}"
    "assistant: {{ m.tool_calls[0].function.name }}\n{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}"
    "{% endfor %}assistant:")
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                            "required": ["city"]}}}]


def tool_server(tok, script):
    from llama_demo.text.chat_format import JinjaChatFormat

    client = FakeClient(tok, max_seq_len=SEQ, script=script)
    return client, ServerThread(build_app(client, JinjaChatFormat(TOOL_TEMPLATE, tok), ServerConfig()), free_port())


def test_llama31_json_tool_calls_come_back_as_tool_calls(tok):
    client, server = tool_server(tok, '{"name": "get_weather", "parameters": {"city": "Paris"}}')
    with server as s:
        out = oai(s).chat.completions.create(model="m", messages=[{"role": "user", "content": "weather?"}],
                                             tools=WEATHER, max_tokens=60)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        assert tok.decode(client.requests[-1][0]).startswith("Tools: get_weather")
        chunks = list(oai(s).chat.completions.create(model="m", messages=[{"role": "user", "content": "weather?"}],
                                                     tools=WEATHER, max_tokens=60, stream=True))
        calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        assert calls[0].function.name == "get_weather" and chunks[-1].choices[0].finish_reason == "tool_calls"
        follow_up = [{"role": "user", "content": "weather?"},
                     {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        oai(s).chat.completions.create(model="m", messages=follow_up, tools=WEATHER, max_tokens=60)
        assert "ipython: sunny" in tok.decode(client.requests[-1][0])
        oai(s).chat.completions.create(model="m", messages=[{"role": "user", "content": "weather?"}], tools=WEATHER,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       max_tokens=60)
        assert '"get_weather"' in client.requests[-1][1].grammar  # a forced call is a grammar
        none = oai(s).chat.completions.create(model="m", messages=[{"role": "user", "content": "weather?"}],
                                              tools=WEATHER, tool_choice="none", max_tokens=60)
        assert none.choices[0].message.content.startswith("{") and not none.choices[0].message.tool_calls
        assert not tok.decode(client.requests[-1][0]).startswith("Tools")


def test_text_answers_stay_text_when_tools_are_offered(tok):
    _, server = tool_server(tok, "It is sunny.")
    with server as s:
        out = oai(s).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], tools=WEATHER,
                                             max_tokens=60)
        assert out.choices[0].message.content == "It is sunny." and out.choices[0].finish_reason == "stop"
        r = httpx.post(f"{s.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                              "tools": WEATHER, "tool_choice": {"function": {"name": "x"}}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
