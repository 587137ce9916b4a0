"""The FastAPI app: OpenAI-compatible completions over a `BatchEngine` running in a worker thread.

```
HTTP request ──► ChatBody / CompletionBody (FastAPI's validation; 400 on bad input) ──► tokenize (chat template, or plain text) ──► engine.submit
engine worker thread: step() loop ──► SequenceUpdate ──► loop.call_soon_threadsafe ──► asyncio.Queue per request
handler: JSON response at the end, or SSE chunks as updates arrive ("data: {...}\n\n", then "data: [DONE]")
a client gone (stream closed, or disconnect seen while waiting) ──► handle.cancel() ──► slot freed next step
```
Every error is answered with an OpenAI-style body {"error": {"message", "type", "param", "code"}}: bad input,
including a prompt the tokenizer or chat template refuses, with 400; anything unexpected with 500.
`/metrics` is Prometheus' text format through `prometheus_client` (a collector reading the engine's counters).
Chat requests use the tokenizer's chat template when the model has one; without one, the messages' contents
are joined as plain text, one message per line (roles are dropped).
Prompts are tokenized on the event loop with a private copy of the tokenizer, so they never share Rust
tokenizer state with the engine thread's decoding.
"""
from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..batching import BatchEngine, SequenceHandle, SequenceUpdate
from ..step import GenerationSettings
from ..errors import LeapdecodeError, PromptTooLongError
from ..sampling import SamplingParams
from ..stats import GenerationResult
from .several import SUPERPOSED, Several
from .schema import CHAT, COMPLETION, APIError, ChatBody, CompletionBody, CompletionRequest, validation_error

log = logging.getLogger("leapdecode.server")


@dataclass(frozen=True)
class ServerConfig:
    model_name: str  # the id clients pass as `model`
    default_method: str = "ar"
    max_tokens_limit: int | None = None  # None: the model's context length
    default_max_tokens: int = 256  # when a request gives no max_tokens (capped by the limit)
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024


@dataclass
class _Counters:
    requests: dict[tuple[str, int], int] = field(default_factory=dict)  # (endpoint, status) -> count

    def count(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1


def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _internal(err: Exception) -> APIError:
    """An unexpected error as an OpenAI-style 500."""
    return APIError(500, f"internal server error: {type(err).__name__}: {err}", type="server_error")


def _finish_reason(result: GenerationResult) -> str:
    return "stop" if result.stats.stop_reason in ("eos", "stop_string") else "length"


def _usage(result: GenerationResult) -> dict:
    p, c = len(result.prompt_ids), len(result.token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _stats(result: GenerationResult) -> dict:
    st = result.stats
    return {"method": st.method, "mean_accepted": round(st.mean_accepted, 4),
            "acceptance_rate": round(st.acceptance_rate, 4), "target_forward_passes": st.target_forward_passes,
            "drafted_tokens": st.drafted_tokens, "stop_reason": st.stop_reason,
            "wall_time": round(st.wall_time, 4), "tokens_per_s": round(st.tokens_per_s, 2)}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class _Service:
    """Request handling shared by both endpoints."""

    def __init__(self, engine: BatchEngine, config: ServerConfig):
        self.engine, self.config = engine, config
        target = engine.target
        self.tokenizer = copy.deepcopy(target.tokenizer)  # for the event loop thread only
        self.has_chat_template = target.has_chat_template
        self.limit = config.max_tokens_limit or target.context_length
        self.counters = _Counters()
        self.started = int(time.time())

    # ----- request -> engine -----
    def encode(self, req: CompletionRequest) -> list[int]:
        """Prompt token ids; a prompt the tokenizer or the chat template refuses is a 400, not a 500."""
        param = "messages" if req.kind == CHAT else "prompt"
        if req.kind == COMPLETION and not isinstance(req.prompt, str):
            vocab = self.engine.target.vocab_size
            if any(not 0 <= t < vocab for t in req.prompt):
                raise APIError(400, f"token ids must be in [0, {vocab})", "prompt")
            ids = list(req.prompt)
        else:
            try:
                ids = self._tokenize(req)
            except Exception as err:  # e.g. a template that raises on a role order it does not accept
                what = "the chat template" if req.kind == CHAT and self.has_chat_template else "the tokenizer"
                raise APIError(400, f"{what} refused the prompt: {type(err).__name__}: {err}", param,
                               "invalid_prompt") from None
        if not ids:
            raise APIError(400, "the prompt is empty after tokenization", param)
        context = self.engine.target.context_length
        if len(ids) >= context:
            raise APIError(400, f"the prompt has {len(ids)} tokens but the model's context is {context} tokens",
                           param, "context_length_exceeded")
        return ids

    def _tokenize(self, req: CompletionRequest) -> list[int]:
        tok = self.tokenizer
        if req.kind == CHAT:
            if self.has_chat_template:
                ids = tok.apply_chat_template(list(req.messages), add_generation_prompt=True, tokenize=True)
                ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            else:
                ids = tok("\n".join(m["content"] for m in req.messages), add_special_tokens=True)["input_ids"]
        else:
            ids = tok(req.prompt, add_special_tokens=True)["input_ids"]
        return [int(i) for i in ids]

    def settings(self, req: CompletionRequest) -> tuple[str, GenerationSettings]:
        if req.model is not None and req.model != self.config.model_name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves "
                           f"'{self.config.model_name}'", "model", "model_not_found")
        method = req.method or self.config.default_method
        if method not in self.engine.methods:
            raise APIError(400, f"unknown method '{method}'; this server loaded: {', '.join(self.engine.methods)}",
                           "method", "unknown_method")
        max_tokens = req.max_tokens if req.max_tokens is not None else min(self.config.default_max_tokens, self.limit)
        if not 0 < max_tokens <= self.limit:
            raise APIError(400, f"'max_tokens' must be in [1, {self.limit}], got {max_tokens}", "max_tokens")
        try:
            params = SamplingParams(temperature=req.temperature, top_p=req.top_p)
            return method, GenerationSettings(max_new_tokens=max_tokens, params=params, seed=req.seed, stop=req.stop)
        except LeapdecodeError as err:
            raise APIError(400, str(err)) from None

    def submit(self, req: CompletionRequest) -> tuple[SequenceHandle, asyncio.Queue, list[int], str]:
        method, settings = self.settings(req)
        ids = self.encode(req)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[SequenceUpdate] = asyncio.Queue()

        def deliver(update: SequenceUpdate) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(queue.put_nowait, update)

        try:
            handle = self.engine.submit(ids, method, settings, on_update=deliver)
        except PromptTooLongError as err:
            raise APIError(400, str(err), code="context_length_exceeded") from None
        except LeapdecodeError as err:
            raise APIError(400, str(err)) from None
        return handle, queue, ids, method

    # ----- responses -----
    def _choice(self, req: CompletionRequest, text: str, finish: str | None, delta: bool, first: bool = False) -> dict:
        if req.kind == COMPLETION:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if delta:
            body = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": body, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def _envelope(self, req: CompletionRequest, rid: str, chunk: bool) -> dict:
        kind = "chat.completion" if req.kind == CHAT else "text_completion"
        return {"id": rid, "object": kind + (".chunk" if chunk and req.kind == CHAT else ""),
                "created": int(time.time()), "model": self.config.model_name}

    async def complete(self, request: Request, req: CompletionRequest) -> Response:
        handle, queue, _, _ = self.submit(req)
        rid = ("chatcmpl-" if req.kind == CHAT else "cmpl-") + uuid.uuid4().hex[:24]
        try:
            while True:
                try:
                    update = await asyncio.wait_for(queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        handle.cancel()
                        return Response(status_code=499)
                    continue
                if update.finished:
                    break
        finally:
            handle.cancel()  # a no-op once finished; frees the slot if this handler is cancelled
        if update.error:
            raise APIError(500, f"generation failed: {update.error}", type="server_error")
        result = update.result
        body = self._envelope(req, rid, chunk=False)
        body["choices"] = [self._choice(req, result.text, _finish_reason(result), delta=False)]
        body["usage"] = _usage(result)
        body["leapdecode"] = _stats(result)
        return JSONResponse(body)

    def stream(self, req: CompletionRequest) -> StreamingResponse:
        handle, queue, _, _ = self.submit(req)
        rid = ("chatcmpl-" if req.kind == CHAT else "cmpl-") + uuid.uuid4().hex[:24]

        async def events():
            try:
                if req.kind == CHAT:  # the first chunk carries the role
                    yield _sse({**self._envelope(req, rid, True), "choices": [self._choice(req, "", None, True, True)]})
                while True:
                    update = await queue.get()
                    if update.text:
                        yield _sse({**self._envelope(req, rid, True),
                                    "choices": [self._choice(req, update.text, None, True)]})
                    if not update.finished:
                        continue
                    if update.error:
                        yield _sse(APIError(500, f"generation failed: {update.error}", type="server_error").body())
                        break
                    result = update.result
                    final = {**self._envelope(req, rid, True),
                             "choices": [self._choice(req, "", _finish_reason(result), True)],
                             "usage": _usage(result), "leapdecode": _stats(result)}
                    yield _sse(final)
                    if req.include_usage:  # OpenAI's usage-only chunk
                        yield _sse({**self._envelope(req, rid, True), "choices": [], "usage": _usage(result)})
                    break
                yield _sse("[DONE]")
            finally:
                handle.cancel()  # the client went away (or we are done): free the slot

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})



class _Metrics:
    """A prometheus_client collector: the engine's counters and load, and the requests answered, read at
    each scrape."""

    def __init__(self, service: _Service):
        self.service = service

    def collect(self):
        m, counters = self.service.engine.metrics, self.service.counters
        requests = CounterMetricFamily("leapdecode_requests", "Generation requests answered, by endpoint and HTTP "
                                       "status.", labels=["endpoint", "status"])
        for (endpoint, status), n in sorted(counters.requests.items()):
            requests.add_metric([endpoint, str(status)], n)
        yield requests
        for name, help_, value in (
                ("leapdecode_requests_finished", "Generations finished by the engine.", m.requests_finished),
                ("leapdecode_requests_cancelled", "Generations cancelled (client gone).", m.requests_cancelled),
                ("leapdecode_requests_failed", "Generations ended by an error.", m.requests_failed),
                ("leapdecode_tokens_generated", "Tokens committed over all requests.", m.tokens_generated),
                ("leapdecode_busy_seconds", "Seconds the engine spent stepping.", m.busy_seconds),
                ("leapdecode_target_forward_passes", "Batched target forward passes.", m.batch_passes)):
            yield CounterMetricFamily(name, help_, value=value)
        for name, help_, value in (
                ("leapdecode_tokens_per_second", "Tokens generated per busy second since start.", m.tokens_per_s),
                ("leapdecode_mean_accepted_tokens", "Mean tokens committed per sequence per target pass (1.0 for "
                 "plain decoding).", m.mean_accepted),
                ("leapdecode_queue_depth", "Requests waiting for a batch slot.", m.waiting),
                ("leapdecode_batch_size", "Sequences in the running batch.", m.running),
                ("leapdecode_mean_batch_size", "Mean sequences per target pass since start.", m.mean_batch_size)):
            yield GaugeMetricFamily(name, help_, value=value)


def create_app(engine: BatchEngine, config: ServerConfig) -> FastAPI:
    """The app; its lifespan starts the engine's worker thread and stops it on shutdown."""
    service = _Service(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="leapdecode", lifespan=lifespan)
    app.state.service = service
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Metrics(service))
    endpoints = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if config.api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                return _error(APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                       code="invalid_api_key", type="authentication_error"))
        endpoint = endpoints.get(request.url.path)
        if endpoint is not None and request.method == "POST":  # before FastAPI reads and validates the body
            declared = request.headers.get("content-length", "")
            if (declared.isdigit() and int(declared) > config.max_body_bytes
                    or len(await request.body()) > config.max_body_bytes):
                service.counters.count(endpoint, 413)
                return _error(APIError(413, f"the request body is over {config.max_body_bytes} bytes",
                                       code="body_too_large"))
            if "content-type" not in request.headers:  # a body without a content type is read as JSON
                request.scope["headers"] = [*request.scope["headers"], (b"content-type", b"application/json")]
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError):
        error = validation_error(list(err.errors()))
        if request.url.path in endpoints:
            service.counters.count(endpoints[request.url.path], error.status)
        return _error(error)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return _error(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return _error(APIError(err.status_code, str(err.detail), type="invalid_request_error"))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, err: Exception):
        return _error(_internal(err))

    several = Several(service, _stats)  # `n` > 1, and the method superposed

    async def answer(request: Request, req: CompletionRequest) -> Response:
        if req.n == 1 and req.method != SUPERPOSED:
            return service.stream(req) if req.stream else await service.complete(request, req)
        rid = ("chatcmpl-" if req.kind == CHAT else "cmpl-") + uuid.uuid4().hex[:24]
        if req.stream:
            several._prepare(req)  # a bad request is a 400, not an error inside the stream
            return StreamingResponse(several.events(req, rid, _sse), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(several.body(req, rid, await several.results(req)))

    async def generation(request: Request, req: CompletionRequest, endpoint: str) -> Response:
        try:
            response = await answer(request, req)
        except APIError as err:
            service.counters.count(endpoint, err.status)
            return _error(err)
        except Exception as err:  # a bug: answer it like any other error, and log it with its traceback
            log.exception("unexpected error on %s", request.url.path)
            service.counters.count(endpoint, 500)
            return _error(_internal(err))
        service.counters.count(endpoint, response.status_code)
        return response

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatBody):
        return await generation(request, body.request(), "chat")

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody):
        return await generation(request, body.request(), "completions")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": service.started, "owned_by": "leapdecode",
            "methods": engine.methods, "default_method": config.default_method,
            "context_length": engine.target.context_length, "max_tokens_limit": service.limit}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


class BackgroundServer:
    """Run an app with uvicorn in a thread on 127.0.0.1 and a free port (for tests and benchmarks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
