"""Who may use the server: an OpenAI API key for /v1, a login for the chat page (and Gradio's API
behind it), and where those secrets come from (environment or a file, so they are not on every
rank's command line). Every credential guards every way to the model: with only an API key, the
page's login takes the key as its password."""
from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import secrets
from pathlib import Path
from typing import Callable

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from starlette.routing import Mount

from ..config import API_KEY_ENV, AUTH_ENV, ConfigError
from .errors import ApiError


def read_secret(value: str | None, env: str) -> str | None:
    """A secret given as a flag value, `@path` (read from a file) or, with no flag, the environment."""
    if value is None:
        value = os.environ.get(env) or None
    if value is not None and value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the secret file {path}: {e.strerror}") from None
        if not value:
            raise ConfigError(f"the secret file {path} is empty")
    return value


def parse_login(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigError("the page login must be USER:PASS (--auth, $LLAMA_DEMO_AUTH or @file)")
    return user, password


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warnings(host: str, share: bool, login: tuple[str, str] | None, api_key: str | None) -> list[str]:
    """Start-up warnings for a server others can reach with nothing asked of them."""
    out = []
    if share and login is None:
        out.append("--share publishes the chat page to anyone with the link and there is no login: "
                   f"set ${AUTH_ENV}=USER:PASS (or --auth @file)")
    if not is_loopback(host):
        if login is None:
            out.append(f"serving on {host}, reachable from other machines, with no page login: set ${AUTH_ENV}")
        if api_key is None and login is None:
            out.append(f"the OpenAI API on {host} takes requests from anyone: set ${API_KEY_ENV}")
    return out


def require_api_access(api_key: str | None, login: tuple[str, str] | None) -> list:
    """The /v1 dependency list. With an API key: `Authorization: Bearer KEY` (OpenAI's way) or
    `x-api-key: KEY` (Anthropic's). With
    only a page login: `Bearer USER:PASS` or HTTP basic. Neither: open. Failures are OpenAI 401s."""
    accepted = [k.encode() for k in ([api_key] if api_key else [])]
    if login is not None and not api_key:
        accepted.append(f"{login[0]}:{login[1]}".encode())
    if not accepted:
        return []
    how = ("send 'Authorization: Bearer <API key>' (the OpenAI client's api_key)" if api_key else
           "send 'Authorization: Bearer USER:PASS' (the OpenAI client's api_key='USER:PASS') or HTTP basic auth")

    def check(request: Request) -> None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if not scheme and "x-api-key" in request.headers:  # Anthropic's clients send the key this way
            scheme, value = "bearer", request.headers["x-api-key"]
        given = value.strip().encode()
        if scheme.lower() == "basic" and not api_key:
            try:
                given = base64.b64decode(given, validate=True)
            except (binascii.Error, ValueError):
                given = b""
        elif scheme.lower() != "bearer":
            given = b""
        # compare against every accepted secret, always, so timing says nothing about which was close
        ok = False
        for want in accepted:
            ok |= secrets.compare_digest(given, want)
        if not ok:
            raise ApiError(401, f"this server needs credentials: {how}", type="invalid_request_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": f'{"Bearer" if api_key else "Basic"} realm="llama_demo"'})

    return [Depends(check)]


PageLogin = tuple[str, str] | Callable[[str, str], bool]
KEY_LOGIN_MESSAGE = "This server takes its API key as the password (any user name)."


def page_login(login: tuple[str, str] | None, api_key: str | None) -> PageLogin | None:
    """What the chat page's login form (Gradio's) checks: the page login when there is one; with
    only an API key, the key as the password, whatever the user name, so that neither the page nor
    its Gradio API is a way around the key; with neither, nothing (the page is open)."""
    if login is not None:
        return login
    if not api_key:
        return None
    want = api_key.encode()

    def key_as_password(user: str, password: str) -> bool:
        return secrets.compare_digest(password.encode(), want)

    return key_as_password


def page_login_note(login: tuple[str, str] | None, api_key: str | None) -> str | None:
    """The start-up line saying how the page is guarded when that is not its own login."""
    if login is None and api_key:
        return (f"the chat page and its Gradio API ask for a login: the API key is the password, any user name "
                f"(gradio_client: Client(url, auth=('any', KEY))); set ${AUTH_ENV} for a separate page login")
    return None


GRADIO_API = "/gradio_api/"
# Routes Gradio's own login form calls before there is a session; the check itself answers 401
BEFORE_LOGIN = frozenset({"/gradio_api/login_check", "/gradio_api/login_check/"})


class GradioApiGuard:
    """ASGI middleware: with a page login, every /gradio_api/ route needs the session that login
    gave (Gradio's cookie). Gradio checks it itself on most routes (queue/join, call, upload, info,
    file); this also closes those it leaves open (cancel, heartbeat, stream, startup-events, run
    history), so no route of the page serves anyone without the credential."""

    def __init__(self, app, gradio_app):
        self.app, self.gradio = app, gradio_app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] not in ("http", "websocket") or not path.startswith(GRADIO_API) or path in BEFORE_LOGIN \
                or self._has_session(Request(scope)):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        refusal = JSONResponse({"detail": "Not authenticated: log in on the chat page first (gradio_client: "
                                          "Client(url, auth=(USER, PASSWORD)))"}, status_code=401)
        await refusal(scope, receive, send)

    def _has_session(self, request: Request) -> bool:
        # the two cookies Gradio's /login sets (secure, and one for plain http), as its own check reads them
        cookie_id = self.gradio.cookie_id
        token = request.cookies.get(f"access-token-{cookie_id}") or request.cookies.get(f"access-token-unsecure-{cookie_id}")
        return token is not None and token in self.gradio.tokens


def guard_gradio_api(app):
    """Put Gradio's API routes on `app` (mounted by gr.mount_gradio_app) behind the page's login."""
    mounted = [r.app for r in app.routes if isinstance(r, Mount) and hasattr(r.app, "tokens")]
    assert len(mounted) == 1, "guard_gradio_api needs exactly one mounted Gradio app"
    app.add_middleware(GradioApiGuard, gradio_app=mounted[0])
    return app
