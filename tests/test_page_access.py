"""Every credential guards every way to the model (issue 21, items 1 and 2): for each of no
credential, a page login, an API key, and both, the chat page's Gradio API (through gradio_client
and through raw HTTP), /v1 and the API's docs ask for what the server was given, and only that."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import httpx
import pytest

from conftest import make_tokenizer
from fakes import FakeClient, ServerThread, chat_format
from llama_demo.config import ServerConfig
from llama_demo.model.parallel import free_port
from llama_demo.serve.auth import page_login, page_login_note
from llama_demo.serve.app import build_app
from llama_demo.serve.ui import WARNING
from llama_demo.text.tokenizer import load_tokenizer

LOGIN = ("alice", "s3cret")
KEY = "sk-test-key"
SEQ = 256
# (name, ServerConfig fields)
SETUPS = {"neither": {}, "login": {"auth": LOGIN}, "key": {"api_key": KEY}, "both": {"auth": LOGIN, "api_key": KEY}}
# the Gradio routes a caller without the page's session must not use: answers, queue, uploads, and
# the ones Gradio itself leaves unchecked (cancel, heartbeat, startup events)
GRADIO_ROUTES = [("POST", "/gradio_api/call/chat", {"json": {"data": ["Hello", "", 0.0, 1.0, 4]}}),
                 ("POST", "/gradio_api/queue/join", {"json": {"data": ["Hello", "", 0.0, 1.0, 4], "fn_index": 0,
                                                             "session_hash": "abc"}}),
                 ("POST", "/gradio_api/upload", {"files": {"files": ("a.txt", b"hello")}}),
                 ("POST", "/gradio_api/cancel", {"json": {"session_hash": "abc", "fn_index": 0, "event_id": "x"}}),
                 ("GET", "/gradio_api/heartbeat/abc", {}),
                 ("GET", "/gradio_api/startup-events", {}),
                 ("GET", "/gradio_api/info", {}),
                 ("GET", "/config", {})]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder)
    return load_tokenizer(folder)


@pytest.fixture(scope="module", params=list(SETUPS))
def server(request, tok):
    cfg = ServerConfig(**SETUPS[request.param])
    with ServerThread(build_app(FakeClient(tok, max_seq_len=SEQ), chat_format(tok), cfg), free_port()) as s:
        yield request.param, cfg, s


def page_credentials(cfg: ServerConfig) -> tuple[str, str] | None:
    """What a user types into the page's login form: the login, else the key with any name."""
    return cfg.auth or (("anyone", cfg.api_key) if cfg.api_key else None)


def api_headers(cfg: ServerConfig) -> dict:
    secret = cfg.api_key or (f"{cfg.auth[0]}:{cfg.auth[1]}" if cfg.auth else None)
    return {"Authorization": f"Bearer {secret}"} if secret else {}


def status(client: httpx.Client, method: str, path: str, **kwargs) -> int:
    """The status alone: some of these routes answer with a stream that stays open (heartbeat)."""
    with client.stream(method, path, **kwargs) as r:
        return r.status_code


@contextmanager
def logged_in(url: str, creds: tuple[str, str] | None) -> Iterator[httpx.Client]:
    """A raw HTTP client holding the session Gradio's /login gives (its cookies); None: no login."""
    with httpx.Client(base_url=url, timeout=30) as client:
        if creds is not None:
            r = client.post("/login", data={"username": creds[0], "password": creds[1]})
            assert r.status_code == 200, r.text
        yield client


def gradio_answer(url: str, auth: tuple[str, str] | None) -> str:
    from gradio_client import Client

    client = Client(f"{url}/", auth=auth, verbose=False)
    try:
        return client.submit("Hello", "", 0.0, 1.0, 6, api_name="/chat").result(timeout=30)[0]
    finally:
        client.close()


def test_gradio_client_needs_the_page_credential(server):
    name, cfg, s = server
    creds = page_credentials(cfg)
    if creds is None:
        assert gradio_answer(s.url, None).strip()  # open: anyone gets an answer
        return
    with pytest.raises(ValueError):  # gradio_client's AuthenticationError: "credentials were not provided"
        gradio_answer(s.url, None)
    with pytest.raises(ValueError):  # a login it refuses
        gradio_answer(s.url, (creds[0], "wrong"))
    answer = gradio_answer(s.url, creds)
    assert answer.strip() and not answer.startswith(WARNING), answer
    if name == "both":  # the key is /v1's credential, not the page's
        with pytest.raises(ValueError):
            gradio_answer(s.url, ("anyone", KEY))


@pytest.mark.parametrize("method,path,kwargs", GRADIO_ROUTES, ids=[p for _, p, _ in GRADIO_ROUTES])
def test_gradio_routes_need_the_page_session(server, method, path, kwargs):
    name, cfg, s = server
    creds = page_credentials(cfg)
    with httpx.Client(base_url=s.url, timeout=30) as anonymous:
        if creds is None:
            assert status(anonymous, method, path, **kwargs) != 401
            return
        assert status(anonymous, method, path, **kwargs) == 401
        # an API credential in a header is not the page's session
        assert status(anonymous, method, path, headers=api_headers(cfg), **kwargs) == 401
    with logged_in(s.url, creds) as session:
        assert status(session, method, path, **kwargs) != 401


def test_raw_http_gets_an_answer_with_the_session_only(server):
    """Gradio's two-step call API: POST /gradio_api/call/chat, then read the event's stream."""
    name, cfg, s = server
    creds = page_credentials(cfg)
    with logged_in(s.url, creds) as client:
        r = client.post("/gradio_api/call/chat", json={"data": ["Hello", "", 0.0, 1.0, 4]})
        assert r.status_code == 200, r.text
        body = client.get(f"/gradio_api/call/chat/{r.json()['event_id']}").text
    assert "event: complete" in body, body
    if creds:
        assert httpx.get(f"{s.url}/gradio_api/call/chat/{r.json()['event_id']}", timeout=30).status_code == 401


def test_v1_keeps_its_own_credential(server):
    name, cfg, s = server
    url = f"{s.url}/v1/models"
    if name == "neither":
        assert httpx.get(url).status_code == 200
        return
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers=api_headers(cfg)).status_code == 200
    if name == "both":  # with a key, the page login is not an API credential, and the page session neither
        assert httpx.get(url, headers={"Authorization": f"Bearer {LOGIN[0]}:{LOGIN[1]}"}).status_code == 401
        with logged_in(s.url, LOGIN) as session:
            assert session.get("/v1/models").status_code == 401


@pytest.mark.parametrize("path", ["/v1/openapi.json", "/v1/docs"])
def test_api_docs_need_the_api_credential(server, path):
    name, cfg, s = server
    r = httpx.get(s.url + path)
    if name == "neither":
        assert r.status_code == 200
    else:
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.url + path, headers=api_headers(cfg)).status_code == 200
    if path.endswith(".json"):
        assert "/v1/chat/completions" in httpx.get(s.url + path, headers=api_headers(cfg)).json()["paths"]


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc", "/gradio_api/openapi.json"])
def test_no_other_schema_or_docs_page_is_served_open(server, path):
    """FastAPI's /redoc and Gradio's own FastAPI schema (/openapi.json) are off; Gradio's API schema
    needs the page's session."""
    name, cfg, s = server
    r = httpx.get(s.url + path)
    if path.startswith("/gradio_api/"):
        assert r.status_code == (200 if name == "neither" else 401)
    else:
        assert r.status_code == 404 or "openapi" not in r.text, r.text[:200]


def test_only_a_key_makes_the_page_login_take_it():
    assert page_login(None, None) is None and page_login_note(None, None) is None
    assert page_login(LOGIN, KEY) == LOGIN and page_login_note(LOGIN, KEY) is None
    check = page_login(None, KEY)
    assert check("whoever", KEY) and not check("whoever", KEY + "x") and not check(KEY, "")
    assert "API key is the password" in page_login_note(None, KEY)
