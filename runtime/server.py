"""HTTP front end of the engine: an OpenAI-style completions API, plan control and metrics.

Endpoints:

- ``POST /v1/completions``: ``{"prompt": str | [int], "max_tokens": int, "temperature":
  float, "stream": bool}``. Text prompts use a byte-level tokenizer (UTF-8 bytes are the
  token ids; see :class:`ByteTokenizer`), token-id prompts are used as given. With
  ``stream`` the answer is server-sent events, one per token, then ``data: [DONE]``.
- ``GET /v1/plan`` / ``POST /v1/plan``: the plan in force (``Plan.to_dict`` form) and the
  replicas behind it / apply a new one; groups or fields left out keep their current
  values (``{"mlp": {"replicas": 3}}`` changes only that). A running control loop may
  replace a posted plan at its next interval.
- ``GET /healthz``: 200 while serving, 503 otherwise.
- ``GET /metrics``: Prometheus text (per-operator queue, batch, replicas, latency; TTFT and
  TBT histograms; request outcomes).

Bad requests get 400 with ``{"error": {"message", "type", "code"}}``; overload gets 429
(admission queue full) or 503 (not serving) with a ``Retry-After`` header.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from runtime.control import Plan, PlanError
from runtime.engine import Engine, Overloaded, RequestRejected


class ByteTokenizer:
    """UTF-8 bytes as token ids (ids 0..255); ids the bytes cannot express decode to ``""``.

    The runtime serves random-weight shapes and user checkpoints without shipping a
    tokenizer; clients that have the model's real tokenizer send token ids instead.
    """

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 256:
            raise ValueError(f"byte tokenizer needs a vocabulary of at least 256 ids, got {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (invalid UTF-8 becomes U+FFFD)."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class CompletionRequest(BaseModel):
    """Body of ``POST /v1/completions``."""

    model_config = ConfigDict(extra="ignore")
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    stream: bool = False
    model: str | None = None


def _error(status: int, message: str, etype: str, code: str, retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, int(round(retry_after))))} if retry_after is not None else None
    return JSONResponse({"error": {"message": message, "type": etype, "code": code}}, status_code=status,
                        headers=headers)


class _Stream:
    """Bridges engine events (driver thread) to an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, Any, Any]] = asyncio.Queue()

    def __call__(self, kind: str, a: Any, b: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, a, b))
        except RuntimeError:  # event loop closed: the client is gone
            pass


def create_app(engine: Engine, model_name: str | None = None, controller: Any = None) -> FastAPI:
    """The FastAPI app serving ``engine``.

    Args:
        engine: a started :class:`Engine`.
        model_name: name reported in responses (defaults to the model config's name).
        controller: the running :class:`runtime.controllers.ControlLoop`, if any (shown by
            ``GET /v1/plan``).
    """
    app = FastAPI(title="opscale runtime", version="0.1.0")
    tok = ByteTokenizer(engine.cfg.vocab_size)
    name = model_name or engine.cfg.name

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        return _error(400, "; ".join(parts) or "invalid request", "invalid_request_error", "invalid_request")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Response:
        prompt = tok.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
        stream = _Stream(asyncio.get_running_loop())
        try:
            seq = engine.submit(prompt, req.max_tokens, req.temperature, on_event=stream)
        except RequestRejected as e:
            return _error(400, e.reason, "invalid_request_error", e.code)
        except Overloaded as e:
            status = 503 if e.code == "not_running" else 429
            return _error(status, e.reason, "overloaded", e.code, retry_after=e.retry_after_s)
        rid = f"cmpl-{uuid.uuid4().hex[:16]}"
        created = int(time.time())
        if req.stream:
            return StreamingResponse(_sse(engine, seq, stream, tok, rid, created, name),
                                     media_type="text/event-stream")
        ids: list[int] = []
        try:
            while True:
                kind, a, _ = await stream.queue.get()
                if kind == "token":
                    ids.append(a)
                elif kind == "done":
                    break
                else:
                    return _error(503, f"request failed: {a}", "server_error", "engine_error", retry_after=1.0)
        except asyncio.CancelledError:
            engine.cancel(seq)
            raise
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": created, "model": name,
            "choices": [{"index": 0, "text": tok.decode(ids), "token_ids": ids, "finish_reason": "length"}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(ids),
                      "total_tokens": len(prompt) + len(ids)},
        })

    @app.get("/v1/plan")
    async def get_plan() -> dict[str, Any]:
        return {"plan": engine.plan.to_dict(), "replicas": engine.describe(),
                "controller": getattr(controller, "name", None)}

    @app.post("/v1/plan")
    async def post_plan(request: Request) -> Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "body must be a JSON object", "invalid_request_error", "invalid_json")
        data = body.get("plan", body) if isinstance(body, dict) else body
        if not isinstance(data, dict):
            return _error(400, "plan must be a JSON object {group: {replicas, max_batch, placement, tp}}",
                          "invalid_request_error", "invalid_plan")
        current = engine.plan.to_dict()
        merged: dict[str, Any] = {}
        for g, fields in {**current, **data}.items():
            merged[g] = {**current[g], **fields} if g in current and isinstance(fields, dict) else fields
        try:
            plan = Plan.from_dict(merged)
        except PlanError as e:
            return _error(400, str(e), "invalid_request_error", "invalid_plan")
        applied = engine.apply(plan)
        return JSONResponse({"plan": applied.to_dict(), "replicas": engine.describe()})

    @app.get("/healthz")
    async def healthz() -> Response:
        if not engine.running:
            return _error(503, "engine is not serving", "unavailable", "not_running", retry_after=1.0)
        return JSONResponse({"status": "ok", "model": name, "iterations": engine.iterations})

    @app.get("/metrics")
    async def metrics() -> Response:
        engine.refresh_gauges()
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _sse(engine: Engine, seq: Any, stream: _Stream, tok: ByteTokenizer, rid: str, created: int,
               name: str) -> AsyncIterator[bytes]:
    def event(obj: Any) -> bytes:
        return f"data: {json.dumps(obj)}\n\n".encode()

    try:
        while True:
            kind, a, b = await stream.queue.get()
            if kind == "token":
                yield event({"id": rid, "object": "text_completion", "created": created, "model": name,
                             "choices": [{"index": 0, "text": tok.decode([a]), "token_id": a, "token_index": b,
                                          "finish_reason": None}]})
            elif kind == "done":
                yield event({"id": rid, "object": "text_completion", "created": created, "model": name,
                             "choices": [{"index": 0, "text": "", "finish_reason": a}]})
                break
            else:
                yield event({"error": {"message": str(a), "type": "server_error"}})
                break
        yield b"data: [DONE]\n\n"
    finally:
        if not seq.finished.is_set():
            engine.cancel(seq)


class ServerThread:
    """Run an app under uvicorn on a background thread (tests, benchmarks).

    ``port=0`` picks a free port; :attr:`url` is set once the server listens.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="opscale-http", daemon=True)
        self.url = ""

    def start(self, timeout: float = 10.0) -> "ServerThread":
        """Start and wait until the socket listens."""
        self.thread.start()
        deadline = time.perf_counter() + timeout
        while not self.server.started:
            if time.perf_counter() > deadline or not self.thread.is_alive():
                raise RuntimeError("HTTP server did not start")
            time.sleep(0.01)
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit and join its thread."""
        self.server.should_exit = True
        self.thread.join(timeout)
