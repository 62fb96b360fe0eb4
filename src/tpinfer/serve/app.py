"""The OpenAI-compatible HTTP app (FastAPI) on rank 0, and the state its handlers share.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics; a server started
on an encoder answers POST /v1/embeddings instead of the two completion routes (``serve/embeddings.py``), and each
kind of server answers the other kind's routes with a 400.
Every error is an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``. A pure-ASGI
``Guard`` in front of the app checks the API key on /v1 routes and caps request bodies before any
JSON is parsed. Nothing from a request reaches a shell, a file path or pickle: prompts become token
ids, and only token ids cross to the other ranks.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tpinfer.engine.sampling import SamplingParams
from tpinfer.engine.scheduler import Router, Scheduler, Sequence
from tpinfer.generation import GenerationDefaults
from tpinfer.serve import handlers
from tpinfer.serve.handlers import APIError
from tpinfer.serve.metrics import Metrics
from tpinfer.serve.outputs import ChoiceOutput, Mailbox, RequestStream
from tpinfer.serve.schemas import ModelCard, ModelList, SamplingRequest
from tpinfer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

GREEDY_BELOW = 1e-5  # temperatures this small sample greedily (dividing logits by them overflows float32)


@dataclass(frozen=True)
class AppSettings:
    model_names: tuple[str, ...]  # names clients may send; the first is listed and put in responses
    max_model_len: int
    max_num_seqs: int
    vocab_size: int
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)  # from generation_config.json
    echo_logprobs: bool = True  # rank 0 gets prompt logits (no pipeline stages, no data-parallel replicas)
    embedding_dimension: int | None = None  # an encoder's pooled embedding size; None: a causal LM


def _pick(requested, default, fallback):  # noqa: ANN001, ANN202
    """The request's value, else the checkpoint's default, else OpenAI's."""
    return requested if requested is not None else default if default is not None else fallback


class ServerState:
    """What handlers share: tokenizer, scheduler, metrics, the open request streams, and health.

    ``status``: "ok", then "draining" after SIGTERM/SIGINT or "failed" after a rank failure; both
    refuse new requests with 503. ``fail`` may be called from any thread (the launcher's watchdog).
    """

    def __init__(self, settings: AppSettings, tokenizer: Tokenizer, metrics: Metrics) -> None:
        self.settings, self.tokenizer, self.metrics = settings, tokenizer, metrics
        self.scheduler: Scheduler | Router | None = None  # a Router over one scheduler per data-parallel replica
        self.schedulers: list[Scheduler] = []
        self.embed_queue = None  # an encoder server's queue (serve.embeddings.EmbedQueue); None for a causal LM
        self.status = "starting"
        self.failure: str | None = None
        self.on_failure: Callable[[], None] | None = None  # the server's "exit now" (thread-safe)
        self.streams: set[RequestStream] = set()
        self._mailbox: Mailbox | None = None  # the event loop's, for every stream's events from the engine thread
        self._lock = threading.Lock()

    @property
    def model_name(self) -> str:
        return self.settings.model_names[0]

    def check_model(self, requested: str | None) -> str:
        if requested is not None and requested not in self.settings.model_names:
            raise APIError(400, f"The model `{requested}` does not exist; this server serves `{self.model_name}`.",
                           "model", "model_not_found")
        return self.model_name

    def submit(self, prompts: list[list[int]], max_tokens: list[int], req: SamplingRequest,
               top_logprobs: int | None, echo: bool = False) -> RequestStream:
        """Queue ``req.n`` sequences per prompt (echoing each prompt first with ``echo``; a limit of 0 tokens then
        generates nothing); 503 at once when the server is busy or stopping."""
        count = len(prompts) * req.n
        if count > self.settings.max_num_seqs:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={req.n} = {count} sequences; this server runs at most "
                           f"{self.settings.max_num_seqs} at once (--max-num-seqs)", "n")
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = Mailbox(loop, deferring=bool(self.schedulers))
            for scheduler in self.schedulers:  # each flushes the engine thread's events after its step messages
                scheduler.after_send = self._mailbox.flush
        stream = RequestStream(self._mailbox, sum(len(p) for p in prompts))
        d = self.settings.defaults
        temperature = _pick(req.temperature, d.temperature, 1.0)
        temperature = 0.0 if temperature < GREEDY_BELOW else temperature
        top_p, top_k = _pick(req.top_p, d.top_p, 1.0), max(_pick(req.top_k, d.top_k, 0), 0)
        for p, (prompt, limit) in enumerate(zip(prompts, max_tokens, strict=True)):
            for i in range(req.n):
                index = p * req.n + i
                params = SamplingParams(max_new_tokens=max(limit, 1), temperature=temperature, top_k=top_k,
                                        top_p=top_p, ignore_eos=req.ignore_eos,
                                        seed=None if req.seed is None else (req.seed + index) % 2**64)
                output = ChoiceOutput(stream, index, self.tokenizer, self.metrics, req.stop_strings,
                                      top_logprobs is not None, req.stream)
                stream.sequences.append(Sequence(prompt, params, output, top_logprobs, echo=echo,
                                                 generate=limit > 0))
        with self._lock:
            self._check_available()
            self.streams.add(stream)
        try:
            accepted = self.scheduler.add(stream.sequences)
        except ValueError as exc:  # the handlers check lengths first; this is the scheduler's own check
            accepted = False
            raise APIError(400, str(exc)) from None
        finally:
            if not accepted:
                with self._lock:
                    self.streams.discard(stream)
        if not accepted:
            raise APIError(503, f"the server is at capacity ({self.settings.max_num_seqs} running, "
                           f"{self.scheduler.max_waiting} waiting); retry later", code="queue_full")
        return stream

    def close(self, stream: RequestStream, outcome: str) -> None:
        """The handler is done with ``stream``: success, error, or the client left (its slots are freed)."""
        with self._lock:
            if stream not in self.streams:
                return
            self.streams.discard(stream)
        if outcome != "success":
            stream.cancel()
        else:
            self.metrics.finished(stream.prompt_tokens, time.monotonic() - stream.arrival)
        self.metrics.request(outcome)

    def _check_available(self) -> None:
        if self.status == "failed":
            raise APIError(503, f"the server has failed: {self.failure}", code="server_failed")
        if self.status != "ok":
            raise APIError(503, f"the server is {self.status}", code="unavailable")

    def drain(self) -> None:
        with self._lock:
            if self.status == "ok":
                self.status = "draining"

    @property
    def busy(self) -> bool:
        """Requests still open: streams, and an encoder's embedding requests queued or running."""
        queue = self.embed_queue
        return bool(self.streams) or (queue is not None and bool(queue.num_waiting or queue.num_running))

    def fail_open_requests(self, message: str) -> None:
        with self._lock:
            streams = list(self.streams)
        for stream in streams:
            stream.fail(message)

    def fail(self, message: str) -> None:
        """A rank failed: fail every open request, report unhealthy, and ask the server to exit."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure, self.status = message, "failed"
        log.error("failing open requests and stopping: %s", message)
        self.fail_open_requests(f"the inference engine failed: {message}")
        if self.on_failure is not None:
            self.on_failure()


class Guard:
    """Pure ASGI, in front of everything: API key on /v1 routes, and a cap on request bodies (413)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state
        key = state.settings.api_key
        self._expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self._expected is not None and scope["path"].startswith("/v1"):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self._expected):
                self.state.metrics.request("unauthorized")
                error = APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                return await _send_error(send, error, [(b"www-authenticate", b"Bearer")])
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.state.settings.max_body_bytes
        too_large = APIError(413, f"request body larger than {limit} bytes", code="request_too_large")
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > limit:
            self.state.metrics.request("invalid")
            return await _send_error(send, too_large if declared.isdigit() else APIError(400, "bad Content-Length"))
        body = bytearray()
        while True:  # read the body here, bounded, then hand it to the app in one piece
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                self.state.metrics.request("invalid")
                return await _send_error(send, too_large)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


async def _send_error(send: Send, error: APIError, headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = error.body()
    await send({"type": "http.response.start", "status": error.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="tpinfer", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, state=state)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        if exc.status < 500 or exc.status == 503:  # 500s were counted when their stream closed
            state.metrics.request("rejected" if exc.status == 503 else "invalid")
        return Response(exc.body(), exc.status, media_type="application/json")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error = APIError(exc.status_code, str(exc.detail))
        return Response(error.body(), exc.status_code, media_type="application/json")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return Response(APIError(500, f"internal error: {type(exc).__name__}").body(), 500,
                        media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        if state.status == "ok":
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": state.status, "error": state.failure}, 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> Response:
        created = int(time.time())
        cards = [ModelCard(id=state.model_name, created=created, max_model_len=state.settings.max_model_len)]
        return JSONResponse(ModelList(data=cards).model_dump())

    def generating() -> None:
        if state.embed_queue is not None:
            raise APIError(400, f"this server runs an encoder ({state.model_name}), which embeds and does not "
                           "generate: use /v1/embeddings", "model", "model_not_supported")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        generating()
        return await handlers.create_completion(await request.body(), request, state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        generating()
        return await handlers.create_chat_completion(await request.body(), request, state)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        from tpinfer.serve.embeddings import create_embedding

        return await create_embedding(await request.body(), state)

    return app
