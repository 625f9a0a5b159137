"""Rank 0's web front assembled: one FastAPI app on one port.

- `GET /health`: 200 while every rank is in step, 503 with the reason otherwise (draining, after a
  stop signal: serve.shutdown);
- `GET /metrics`: Prometheus metrics (serve.metrics);
- `/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/tokenize`, `/detokenize`, the API
  docs: serve.openai's routers;
- `/v1/responses` (serve.responses) and `/v1/messages` (Anthropic's, serve.messages): other wire
  shapes over the same chat rules and stream loop;
- `/`: the Gradio chat page (serve.ui).
Errors in OpenAI's shape and the body limit (serve.errors), access checked by serve.auth; browsers
on other origins may call the API only when --cors_origins names them.
"""
from __future__ import annotations

import time

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from ..config import ServerConfig
from ..text.chat_format import ChatFormat
from .auth import require_api_access
from .errors import BodyLimit, install_error_handlers
from .gate import Gate
from .loop import EngineClient
from .messages import messages_router
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .openai import OpenAIApi, docs_router, openai_router, tokenizer_router
from .responses import responses_router
from .ui import build_ui, mount_ui


def build_app(client: EngineClient, chat_format: ChatFormat | None, cfg: ServerConfig,
              system_prompt: str = "") -> FastAPI:
    gate = Gate(client.tokenizer, chat_format, client.max_seq_len, client.vocab_size, client.model_name)
    # the API's docs are served by docs_router, behind the same credential as /v1; FastAPI's own are off
    app = FastAPI(title=f"llama_demo: {client.model_name}", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=cfg.max_request_bytes)
    if cfg.cors_origins:  # off by default: a page on another origin may not read the answers
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["*"], allow_credentials="*" not in cfg.cors_origins)
    app.state.metrics = metrics = Metrics(client)
    app.add_api_route("/health", lambda: health_response(client), methods=["GET"])
    app.add_api_route("/metrics", lambda: Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST), methods=["GET"])
    api = OpenAIApi(client, gate, cfg, metrics)
    access = require_api_access(cfg.api_key, cfg.auth)
    app.include_router(docs_router(app, access))  # before openai_router, whose catch-all answers 404
    app.include_router(tokenizer_router(api, access))
    app.include_router(responses_router(api, access))  # before openai_router, whose catch-all answers 404
    app.include_router(messages_router(api, access))
    app.include_router(openai_router(api, access))
    return mount_ui(app, build_ui(client, gate, cfg, system_prompt, metrics), cfg)


def health_response(client: EngineClient) -> JSONResponse:
    h = client.health
    if h.draining_until is not None:  # a load balancer should send no more requests here
        left = max(0.0, h.draining_until - time.monotonic())
        return JSONResponse({"status": "draining", "reason": f"the server is stopping: it finishes the requests it has "
                             f"(at most {left:.0f} s more) and takes no new ones", "running": h.running,
                             "waiting": h.waiting}, status_code=503)
    if h.ok():
        return JSONResponse({"status": "ok", "running": h.running, "waiting": h.waiting})
    if h.error or not h.loop_alive:
        reason = f"the serving loop stopped: {h.error or 'no error recorded'}"
    else:
        reason = f"no collective for {time.monotonic() - h.last_collective:.0f}s: a rank may be hung"
    return JSONResponse({"status": "unavailable", "reason": reason, "running": h.running, "waiting": h.waiting},
                        status_code=503)
