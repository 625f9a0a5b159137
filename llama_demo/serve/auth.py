"""Who may use the server: an OpenAI API key for /v1, a login for the chat page, and where those
secrets come from (environment or a file, so they are not on every rank's command line)."""
from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import secrets
from pathlib import Path

from fastapi import Depends, Request

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
