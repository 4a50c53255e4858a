"""The chat server's FastAPI app: `create_app(pool, ...)`; `python -m scripts.chat_web` serves it with uvicorn.

Endpoints:
    GET  /                      the chat page (ui.html: one self-contained file, nothing loaded from elsewhere)
    POST /chat/completions      {"messages": [...], "temperature"?, "top_k"?, "max_tokens"?, "seed"?} ->
                                server-sent events: data: {"token": "..."} ... data: {"done": true, ...}
    POST /v1/chat/completions   OpenAI-compatible: "stream": true -> chat.completion.chunk events + data: [DONE];
                                otherwise one chat.completion JSON with choices[0].message.content and usage
    GET  /v1/models             OpenAI-compatible list with the one model served (clients ask for it first)
    GET  /health                {"status": "ok", "ready": ..., "workers": ..., "available": ...}
    GET  /stats                 workers, busy, waiting, requests served / cancelled / failed / rejected, tokens

Errors are JSON {"error": {"message": ..., "type": ..., "param": ..., "code": status}}: 400 for invalid input
(see nanochat.web.limits), 404 for an unknown path, 405 for a wrong method, 413 for an oversized body, 503 when
no worker frees up in time or too many requests already wait.

Streaming: the reply runs on a worker thread (nanochat.web.pool); between tokens the handler checks whether the
client is still connected, and a client that leaves cancels its reply, which frees the worker.
"""

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from nanochat.web.generation import SamplingParams, prompt_ids
from nanochat.web.limits import ChatRequest, Limits, RequestError, SamplingDefaults, parse_chat_request, parse_json
from nanochat.web.pool import Job, PoolBusyError, WorkerPool

UI_PATH = Path(__file__).with_name("ui.html")
DISCONNECT_POLL_S = 0.25  # while the model is slow to produce a token, look for a vanished client this often
ENDPOINTS = ("GET /", "POST /chat/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /health",
             "GET /stats")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


def sse(payload) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def error_body(status: int, message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing (413) anything over `limit` bytes: first by Content-Length, then while reading
    (a chunked upload has no Content-Length, and a client may lie about it)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"invalid Content-Length header {declared!r}")
        if int(declared) > limit:
            raise RequestError(413, f"the request body is {declared} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # hung up mid-upload: answer like any bad request (uvicorn drops the reply)
        raise RequestError(400, "the client disconnected before sending the whole body") from None
    return b"".join(chunks)


class ChatService:
    """What the endpoints share: validation, prompt building, running a job, reading its pieces."""

    def __init__(self, pool: WorkerPool, defaults: SamplingDefaults, limits: Limits, model_name: str):
        self.pool = pool
        self.defaults = defaults
        self.limits = limits
        self.model_name = model_name

    async def parse(self, request: Request, openai: bool) -> ChatRequest:
        body = parse_json(await read_body(request, self.limits.max_body_bytes))
        return parse_chat_request(body, self.limits, self.defaults, openai=openai)

    def plan(self, chat: ChatRequest) -> tuple[list[int], SamplingParams]:
        """Prompt ids and sampling settings; the reply may not run past the model's context length."""
        prompt = prompt_ids(self.pool.tokenizer, chat.messages)
        room = self.pool.context_len - len(prompt)
        if room < 1:
            raise RequestError(400, f"the conversation is {len(prompt)} tokens but this model reads at most "
                                    f"{self.pool.context_len}: start a new conversation", "messages")
        params = SamplingParams(max_tokens=min(chat.max_tokens, room), temperature=chat.temperature,
                                top_k=chat.top_k, seed=chat.seed)
        return prompt, params

    async def start(self, chat: ChatRequest) -> tuple[Job, list[int]]:
        prompt, params = self.plan(chat)
        worker = await self.pool.acquire()
        return self.pool.start(worker, prompt, params), prompt  # no await in between: the worker cannot leak

    @staticmethod
    async def pieces(request: Request, job: Job) -> AsyncIterator[str]:
        """The reply's text pieces until it ends; stops (and cancels the job) as soon as the client is gone."""
        try:
            while True:
                event = await job.next_event(DISCONNECT_POLL_S)
                if event is not None and event[0] == "end":
                    return
                if await request.is_disconnected():
                    return
                if event is not None:
                    yield event[1]
        finally:
            job.cancel.set()  # no-op after a normal end; otherwise the worker thread stops at its next token


async def native_stream(request: Request, job: Job, seed: int) -> AsyncIterator[str]:
    started = time.perf_counter()
    async for piece in ChatService.pieces(request, job):
        yield sse({"token": piece})
    if not job.done:  # the client left: nobody to tell
        return
    if job.error is not None:
        yield sse({"error": job.error})
        return
    reply = job.reply
    yield sse({"done": True, "finish_reason": reply.finish_reason, "tokens": reply.num_tokens, "seed": seed,
               "elapsed_s": round(time.perf_counter() - started, 3)})


async def openai_stream(request: Request, job: Job, prompt_tokens: int, model: str) -> AsyncIterator[str]:
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}

    def chunk(delta: dict, finish_reason: str | None = None, **extra) -> str:
        return sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra})

    yield chunk({"role": "assistant", "content": ""})
    async for piece in ChatService.pieces(request, job):
        yield chunk({"content": piece})
    if not job.done:  # the client left: nobody to tell
        return
    if job.error is not None:
        yield sse(error_body(500, job.error, "server_error"))
    else:
        yield chunk({}, job.reply.finish_reason, usage=usage(prompt_tokens, job.reply.num_tokens))
    yield sse("[DONE]")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def create_app(pool: WorkerPool, defaults: SamplingDefaults | None = None, limits: Limits | None = None,
               model_name: str = "nanochat") -> FastAPI:
    """The FastAPI app serving `pool`. `defaults` fill in sampling fields a request leaves out."""
    service = ChatService(pool, defaults or SamplingDefaults(), limits or Limits(), model_name)
    page = UI_PATH.read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        pool.close()  # cancel replies still running so shutdown does not wait for them

    app = FastAPI(title="nanochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError):
        return JSONResponse(error_body(exc.status, exc.message, "invalid_request_error", exc.param), exc.status)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException):
        """Unknown paths (404) and wrong methods (405) answer in the same error format as everything else."""
        if exc.status_code == 404:
            message = f"no endpoint at {request.url.path}; the endpoints are {', '.join(ENDPOINTS)}"
            kind = "not_found_error"
        elif exc.status_code == 405:
            allowed = exc.headers.get("Allow", "") if exc.headers else ""
            message = f"{request.method} is not allowed on {request.url.path}; use {allowed or 'another method'}"
            kind = "method_not_allowed"
        else:
            message, kind = str(exc.detail), "http_error"
        return JSONResponse(error_body(exc.status_code, message, kind), exc.status_code, headers=exc.headers)

    @app.exception_handler(PoolBusyError)
    async def on_busy(request: Request, exc: PoolBusyError):
        return JSONResponse(error_body(503, str(exc), "server_busy"), 503, headers={"Retry-After": "1"})

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        stats = pool.stats()
        return {"status": "ok", "ready": True, "model": model_name, "workers": stats["workers"],
                "available": stats["available"]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(pool.started_at),
                                            "owned_by": "nanochat"}]}

    @app.get("/stats")
    async def stats():
        return {"model": model_name, **pool.stats()}

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        chat = await service.parse(request, openai=False)
        job, _ = await service.start(chat)
        return StreamingResponse(native_stream(request, job, chat.seed), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(request: Request):
        chat = await service.parse(request, openai=True)
        job, prompt = await service.start(chat)
        if chat.stream:
            return StreamingResponse(openai_stream(request, job, len(prompt), model_name),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        text = "".join([piece async for piece in ChatService.pieces(request, job)])
        if not job.done:  # the client left; 499 (nginx's "client closed request") only shows in the access log
            return Response(status_code=499)
        if job.error is not None:
            return JSONResponse(error_body(500, job.error, "server_error"), 500)
        reply = job.reply
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": reply.finish_reason}],
            "usage": usage(len(prompt), reply.num_tokens),
            "seed": chat.seed,
        }

    return app
