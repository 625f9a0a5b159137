"""`python app.py ...` / `torchrun ... app.py ...`: serve a model to the browser and the OpenAI API.

Every rank loads its slice of the model and runs the same serving loop; rank 0 alone binds the
web port and the request bus. A stop signal drains the job (serve.shutdown): rank 0 decides, and
every rank leaves the serving loop at the same step.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from ..config import API_KEY_ENV, AUTH_ENV, PAGE_SAMPLING, ConfigError, ServerConfig, page_sampling
from ..engine.engine import StepOutOfMemory
from ..model.parallel import shutdown_distributed
from ..serve.auth import exposure_warnings, page_login_note, parse_login, read_secret

log = logging.getLogger("llama_demo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from .startup import add_model_args

    p = argparse.ArgumentParser(prog="app.py", description="Chat with a LLaMA model split across ranks.")
    add_model_args(p, ckpt_help="Meta-layout model folder (default: the embedded SmolLM2-135M-Instruct)")
    d = ServerConfig()
    p.add_argument("--host", default=d.host, help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    p.add_argument("--auth", default=None,
                   help=f"USER:PASS for the chat page (and the API when no API key is set), or @FILE holding it; "
                        f"default ${AUTH_ENV}. Prefer the variable or a file: flags show in every process list")
    p.add_argument("--api_key", default=None,
                   help=f"OpenAI API key required as 'Authorization: Bearer KEY' on /v1, or @FILE; default ${API_KEY_ENV}")
    p.add_argument("--max_waiting", type=int, default=d.max_waiting,
                   help="requests that may wait for a free KV row; beyond that a 429 with Retry-After")
    p.add_argument("--max_request_bytes", type=int, default=d.max_request_bytes, help="largest request body (413 above)")
    p.add_argument("--zmq_port", type=int, default=d.zmq_port, help="rank 0's request bus port")
    p.add_argument("--dist_timeout", type=float, default=d.dist_timeout, help="collective timeout in seconds")
    p.add_argument("--heartbeat_interval", type=float, default=d.heartbeat_interval, help="seconds between idle collectives")
    p.add_argument("--drain_timeout", type=float, default=d.drain_timeout,
                   help="on SIGTERM or Ctrl-C, seconds that running and waiting requests get to finish while new "
                        "ones are refused (503); a second signal stops at once. Keep it below torchrun's "
                        "--shutdown_timeout (30 s), after which torchrun kills the ranks")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="use the model's chat format (default: yes for chat/instruct models)")
    p.add_argument("--system_prompt", default=None, help="initial system prompt in the UI")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=PAGE_SAMPLING.max_new_tokens,
                   help="default answer length (the page's slider, and chat requests that name none)")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"the chat page's initial temperature (default: the model's generation_config.json, else {PAGE_SAMPLING.temperature})")
    p.add_argument("--top_p", type=float, default=None,
                   help=f"the chat page's initial top-p (default: the model's generation_config.json, else {PAGE_SAMPLING.top_p})")
    p.add_argument("--cors_origins", default=None,
                   help="comma-separated origins allowed to call the API from a browser (CORS), or '*'; default: none")
    a = p.parse_args(argv)
    if a.heartbeat_interval <= 0 or a.heartbeat_interval >= a.dist_timeout:
        p.error("--heartbeat_interval must be positive and below --dist_timeout")
    if a.drain_timeout < 0:
        p.error("--drain_timeout must be >= 0 (0: stop without waiting for requests in flight)")
    if a.max_waiting < 0 or a.max_request_bytes < 1024 or a.max_new_tokens < 1:
        p.error("--max_waiting must be >= 0, --max_request_bytes >= 1024 and --max_new_tokens >= 1")
    return a


def server_config(a: argparse.Namespace) -> ServerConfig:
    return ServerConfig(host=a.host, port=a.port, zmq_port=a.zmq_port, share=a.share,
                        auth=parse_login(read_secret(a.auth, AUTH_ENV)), api_key=read_secret(a.api_key, API_KEY_ENV),
                        max_batch_size=a.max_batch_size, max_waiting=a.max_waiting,
                        max_request_bytes=a.max_request_bytes, dist_timeout=a.dist_timeout,
                        heartbeat_interval=a.heartbeat_interval, drain_timeout=a.drain_timeout, chat=a.chat,
                        page=page_sampling(None, a.temperature, a.top_p, a.max_new_tokens),
                        cors_origins=[o.strip() for o in (a.cors_origins or "").split(",") if o.strip()])


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}): pass another --port") from None


class WebServer:
    """uvicorn in a thread of rank 0, so the main thread runs the same loop as the other ranks."""

    def __init__(self, app, host: str, port: int):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="web")

    def start(self, timeout_s: float = 60.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError("the web server did not start (port taken?)")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


def resolve_model(a: argparse.Namespace) -> None:
    """No --ckpt_dir: the embedded default model, converted once into the cache (rank 0 first,
    the others wait for the folder: conversion is not repeated per rank)."""
    if a.ckpt_dir:
        return
    from ..weights.default_model import default_model_dir

    a.ckpt_dir = str(default_model_dir())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    web = heartbeat = bus = None
    stopped = False  # the serving loop ended on a stop (a drain), not an error

    def on_sigterm(signum, frame):
        # Until the job serves, SIGTERM ends the rank at once; serving, it drains (serve.shutdown).
        # torchrun sends SIGTERM to every rank when one of them fails or the job is stopped; a
        # one-rank server runs without torchrun, where SIGTERM is `kill` or a service manager
        why = ("another rank failed, or torchrun was stopped; see torchrun's report below"
               if "TORCHELASTIC_RUN_ID" in os.environ else "SIGTERM")
        raise SystemExit(f"llama_demo: rank {rank} stopping: the job was terminated ({why})")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        from ..serve.bus import Bus
        from ..serve.loop import EngineClient, Heartbeat, ServingLoop
        from ..serve.shutdown import Drain, StopSignals, follow_rank0
        from ..text.chat_format import answer_stop_ids, chat_format_for, is_chat_model
        from .startup import build_engine

        cfg = server_config(a)
        if rank == 0:
            check_port_free(cfg.host, cfg.port)
        resolve_model(a)
        cfg.page = page_sampling(a.ckpt_dir, a.temperature, a.top_p, a.max_new_tokens)
        engine, tokenizer = build_engine(a, cfg.dist_timeout)
        bus = Bus(rank, os.environ.get("MASTER_ADDR", "127.0.0.1"), cfg.zmq_port)
        bus.handshake()
        client = None
        chat = cfg.chat if cfg.chat is not None else is_chat_model(a.ckpt_dir)
        chat_format = chat_format_for(a.ckpt_dir, tokenizer) if chat else None
        # rank 0 decides where answers end (the others follow its flags), on the ids the gate checks grammars with
        engine.stop_ids = answer_stop_ids(tokenizer, chat_format)
        if rank == 0:
            from ..serve.app import build_app

            for warning in exposure_warnings(cfg.host, cfg.share, cfg.auth, cfg.api_key):
                print(f"warning: {warning}", file=sys.stderr, flush=True)
            if note := page_login_note(cfg.auth, cfg.api_key):
                print(f"llama_demo: {note}", flush=True)
            client = EngineClient(bus, engine, Path(a.ckpt_dir).name, cfg.max_batch_size, cfg.max_waiting)
            app = build_app(client, chat_format, cfg, system_prompt=a.system_prompt or "")
            web = WebServer(app, cfg.host, cfg.port)
            web.start()
            heartbeat = Heartbeat(bus, engine, cfg.heartbeat_interval).start()
            url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}/"
            print(f"llama_demo: serving {client.model_name} on {engine.world_size} rank(s) "
                  f"({'chat' if chat_format else 'completion'} mode) at {url}  (OpenAI API: {url}v1)", flush=True)
            measured = engine.calibration  # prompt tokens/s beside a full batch, per chunk
            print(f"llama_demo: {engine.step_tokens} tokens a step (decodes first, then prompts"
                  + (f"; measured prompt tokens/s per chunk: {measured})" if measured else ")"), flush=True)
            if cfg.share:
                from ..serve.ui import ShareError, open_share_tunnel

                try:
                    print(f"llama_demo: public link {open_share_tunnel(cfg.host, cfg.port)}", flush=True)
                except ShareError as e:  # no internet: say so, keep serving locally
                    print(f"warning: {e}", file=sys.stderr, flush=True)
        loop = ServingLoop(engine, bus, cfg.heartbeat_interval, client)
        StopSignals(rank, follow_rank0(rank, loop.health) if rank else Drain(client, bus, cfg.drain_timeout).begin)
        loop.run()  # returns once every rank has applied rank 0's stop
        stopped = True
        return 0
    except KeyboardInterrupt:
        if rank == 0:
            print("\nllama_demo: shutting down", file=sys.stderr)
        return 0
    except (ValueError, OSError) as e:  # bad flags, folders, ports: the user's to fix
        from .startup import say_after_torchrun

        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        say_after_torchrun(f"error: {e}")  # last, after torchrun's report
        return 2
    except StepOutOfMemory as e:  # this rank's device memory, not a lost rank
        print(f"error: {e}; the job stops", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as e:  # a collective failed: another rank died or hung
        print(f"error: rank {rank} lost contact with the other ranks ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
              "the job stops", file=sys.stderr, flush=True)
        return 1
    finally:
        if heartbeat:
            heartbeat.stop()
        if web:
            web.stop()
        if bus:
            bus.close()
        shutdown_distributed()
        if stopped:
            print(f"llama_demo: rank {rank} stopped", file=sys.stderr, flush=True)
