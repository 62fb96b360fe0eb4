"""POST /v1/completions and /v1/chat/completions: a request becomes sequences, their deltas OpenAI responses.

A streamed response is server-sent events: one ``data: {chunk}`` per choice per batch of ready
deltas, ``data: [DONE]`` at the end; a failure mid-stream sends ``data: {"error": {...}}`` first, which
the OpenAI client raises as an ``APIError``. As OpenAI's API, a stream carries usage counts only when the client
asks (``stream_options.include_usage``): on one last chunk with no choices, before ``[DONE]``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from tpinfer.serve.outputs import Delta, Failure, RequestStream, TokenLogprob
from tpinfer.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorDetail,
    ErrorResponse,
    TopLogprob,
    Usage,
)

if TYPE_CHECKING:
    from tpinfer.serve.app import ServerState

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for completions; chat defaults to the rest of the context
DISCONNECT_POLL_S = 1.0  # how often a non-streaming request checks whether its client is still there
DONE = "data: [DONE]\n\n"
RequestModel = TypeVar("RequestModel", bound=BaseModel)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> bytes:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return ErrorResponse(error=ErrorDetail(message=self.message, type=kind, param=self.param,
                                               code=self.code)).model_dump_json().encode()


def parse(model: type[RequestModel], raw: bytes) -> RequestModel:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        if error["type"] == "json_invalid":
            raise APIError(400, f"the body is not valid JSON: {error['msg']}", code="invalid_json") from None
        field = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        param = str(error["loc"][0]) if error["loc"] else None
        raise APIError(400, f"{field}: {message}{more}" if field else f"{message}{more}", param) from None


def _max_new_tokens(state: ServerState, prompt_len: int, requested: int | None, default: int | None,
                    prompt_param: str) -> int:
    limit = state.settings.max_model_len
    if prompt_len >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens, and the prompt alone has "
                       f"{prompt_len}. Please shorten the prompt.", prompt_param, "context_length_exceeded")
    if requested is None:
        return min(default, limit - prompt_len) if default else limit - prompt_len
    if prompt_len + requested > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                       "completion). Please reduce the prompt or max_tokens.", "max_tokens", "context_length_exceeded")
    return requested


def _completion_prompts(state: ServerState, prompt: str | list) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [state.tokenizer.encode(prompt)]
    elif not prompt:
        raise APIError(400, "prompt is empty", "prompt")
    elif isinstance(prompt[0], str):
        prompts = [state.tokenizer.encode(p) for p in prompt]
    elif isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    vocab = state.settings.vocab_size
    for ids in prompts:
        if not ids:
            raise APIError(400, "prompt is empty", "prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
    return prompts


async def create_completion(raw: bytes, http: Request, state: ServerState) -> Response:
    req = parse(CompletionRequest, raw)
    model = state.check_model(req.model)
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens: 0 generates nothing; it is allowed only with echo (to score the prompt)",
                       "max_tokens")
    prompts = _completion_prompts(state, req.prompt)
    default = state.settings.defaults.max_new_tokens or DEFAULT_COMPLETION_TOKENS  # generation_config.json's first
    limits = [_max_new_tokens(state, len(p), req.max_tokens, default, "prompt") for p in prompts]
    if req.echo and req.logprobs is not None and not state.settings.echo_logprobs:
        raise APIError(400, "echo with logprobs needs the prompt's logits on rank 0: this server's layout (pipeline "
                       "stages or data-parallel replicas) does not bring them there; serve with --pp 1 --dp 1",
                       "echo")
    stream = state.submit(prompts, limits, req, req.logprobs, echo=req.echo)
    render = CompletionRenderer(stream, model, req.logprobs)
    if req.stream:
        return _event_stream(stream, state, render, req.include_usage)
    return await _whole(stream, http, state, render)


async def create_chat_completion(raw: bytes, http: Request, state: ServerState) -> Response:
    req = parse(ChatCompletionRequest, raw)
    model = state.check_model(req.model)
    if not state.tokenizer.chat_template:
        raise APIError(400, f"model {model!r} has no chat template, so it cannot serve chat completions; use "
                       "/v1/completions with a plain prompt", "messages", "no_chat_template")
    messages = [m.for_template() for m in req.messages]
    try:
        prompt = state.tokenizer.encode_chat(messages, req.add_generation_prompt, req.tools,
                                             **(req.chat_template_kwargs or {}))
    except Exception as exc:  # the template's own errors (raise_exception, jinja2): the messages do not fit it
        raise APIError(400, f"the chat template failed on these messages: {exc}", "messages") from None
    if not prompt:
        raise APIError(400, "the messages render to an empty prompt", "messages")
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    limit = _max_new_tokens(state, len(prompt), requested, state.settings.defaults.max_new_tokens, "messages")
    top = (req.top_logprobs or 0) if req.logprobs else None
    stream = state.submit([prompt], [limit], req, top)
    render = ChatRenderer(stream, model, req.logprobs)
    if req.stream:
        return _event_stream(stream, state, render, req.include_usage)
    return await _whole(stream, http, state, render)


def _sse(chunks: list[BaseModel]) -> str:
    return "".join(f"data: {chunk.model_dump_json()}\n\n" for chunk in chunks)


def _event_stream(stream: RequestStream, state: ServerState, render: Renderer, include_usage: bool) -> Response:
    async def body() -> AsyncIterator[str]:
        outcome = "cancelled"  # unless it ends otherwise: the client left (the response task was cancelled)
        try:
            opening = render.opening()
            if opening:
                yield _sse(opening)
            async for batch in stream.events():
                failed = next((i for i, event in enumerate(batch) if isinstance(event, Failure)), None)
                text = _sse(render.chunks(batch[:failed]))
                if failed is not None:
                    outcome = "error"
                    error = APIError(500, batch[failed].message, code="engine_failure")
                    yield text + f"data: {error.body().decode()}\n\n" + DONE
                    return
                yield text
            if include_usage:
                text = _sse([render.usage_chunk()])
                outcome = "success"
                yield text + DONE
            else:
                outcome = "success"
                yield DONE
        finally:
            state.close(stream, outcome)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def _whole(stream: RequestStream, http: Request, state: ServerState, render: Renderer) -> Response:
    """Wait for every choice (checking that the client is still there), then answer in one body."""
    outcome = "cancelled"
    deltas: list[Delta] = []
    try:
        finished = 0
        while finished < len(stream.sequences):
            try:
                event = await asyncio.wait_for(stream.queue.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if await http.is_disconnected():
                    return Response(status_code=499)  # nobody reads it
                continue
            if isinstance(event, Failure):
                outcome = "error"
                raise APIError(500, event.message, code="engine_failure")
            deltas.append(event)
            finished += event.finish_reason is not None
        outcome = "success"
    finally:
        state.close(stream, outcome)
    return Response(render.whole(deltas).model_dump_json(), media_type="application/json")


class Renderer:
    """Deltas to OpenAI objects for one request; counts tokens per choice for the usage."""

    def __init__(self, stream: RequestStream, model: str) -> None:
        self.stream, self.model = stream, model
        self.num_choices = len(stream.sequences)
        self.tokens = [0] * self.num_choices

    def usage(self) -> Usage:
        completion = sum(self.tokens)
        prompt = self.stream.prompt_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def merged(self, deltas: list[Delta]) -> list[Delta]:
        """One delta per choice (in first-seen order) out of a batch, and the token counts updated."""
        by_index: dict[int, Delta] = {}
        for d in deltas:
            self.tokens[d.index] = d.num_tokens
            if d.index in by_index:
                m = by_index[d.index]
                by_index[d.index] = Delta(d.index, m.text + d.text, m.logprobs + d.logprobs,
                                          d.finish_reason, d.num_tokens)
            else:
                by_index[d.index] = d
        return list(by_index.values())

    def opening(self) -> list[BaseModel]:
        return []


class CompletionRenderer(Renderer):
    def __init__(self, stream: RequestStream, model: str, logprobs: int | None) -> None:
        super().__init__(stream, model)
        self.logprobs = logprobs
        self.offsets = [0] * self.num_choices

    def _logprobs(self, d: Delta) -> CompletionLogprobs | None:
        if self.logprobs is None:
            return None
        offsets = []
        for t in d.logprobs:
            offsets.append(self.offsets[d.index])
            self.offsets[d.index] += len(t.token)
        top = [None if t.top is None else _first_per_text(t.top) for t in d.logprobs] if self.logprobs > 0 else None
        return CompletionLogprobs(tokens=[t.token for t in d.logprobs], token_logprobs=[t.logprob for t in d.logprobs],
                                  top_logprobs=top, text_offset=offsets)

    def _response(self, choices: list[CompletionChoice], usage: Usage | None) -> CompletionResponse:
        return CompletionResponse(id=f"cmpl-{self.stream.id}", created=self.stream.created, model=self.model,
                                  choices=choices, usage=usage)

    def chunks(self, deltas: list[Delta]) -> list[BaseModel]:
        return [self._response([CompletionChoice(index=d.index, text=d.text, logprobs=self._logprobs(d),
                                                 finish_reason=d.finish_reason)], None)
                for d in self.merged(deltas)]

    def usage_chunk(self) -> BaseModel:
        return self._response([], self.usage())

    def whole(self, deltas: list[Delta]) -> BaseModel:
        merged = sorted(self.merged(deltas), key=lambda d: d.index)
        choices = [CompletionChoice(index=d.index, text=d.text, logprobs=self._logprobs(d),
                                    finish_reason=d.finish_reason) for d in merged]
        return self._response(choices, self.usage())


def _first_per_text(top: list[tuple[str, float]]) -> dict[str, float]:
    """Two token ids can decode to the same text (e.g. partial UTF-8): keep the likelier."""
    out: dict[str, float] = {}
    for text, logprob in top:
        out.setdefault(text, logprob)
    return out


def _chat_logprob(t: TokenLogprob) -> ChatTokenLogprob:
    return ChatTokenLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode()),
                            top_logprobs=[TopLogprob(token=s, logprob=lp, bytes=list(s.encode())) for s, lp in t.top])


class ChatRenderer(Renderer):
    def __init__(self, stream: RequestStream, model: str, logprobs: bool) -> None:
        super().__init__(stream, model)
        self.logprobs = logprobs

    def _logprobs(self, d: Delta) -> ChatLogprobs | None:
        return ChatLogprobs(content=[_chat_logprob(t) for t in d.logprobs]) if self.logprobs else None

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=f"chatcmpl-{self.stream.id}", created=self.stream.created, model=self.model,
                                   choices=choices, usage=usage)

    def opening(self) -> list[BaseModel]:
        return [self._chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                for i in range(self.num_choices)]

    def chunks(self, deltas: list[Delta]) -> list[BaseModel]:
        return [self._chunk([ChatChunkChoice(index=d.index, delta=DeltaMessage(content=d.text),
                                             logprobs=self._logprobs(d), finish_reason=d.finish_reason)])
                for d in self.merged(deltas)]

    def usage_chunk(self) -> BaseModel:
        return self._chunk([], self.usage())

    def whole(self, deltas: list[Delta]) -> BaseModel:
        merged = sorted(self.merged(deltas), key=lambda d: d.index)
        choices = [ChatChoice(index=d.index, message=AssistantMessage(content=d.text), logprobs=self._logprobs(d),
                              finish_reason=d.finish_reason) for d in merged]
        return ChatCompletionResponse(id=f"chatcmpl-{self.stream.id}", created=self.stream.created, model=self.model,
                                      choices=choices, usage=self.usage())
