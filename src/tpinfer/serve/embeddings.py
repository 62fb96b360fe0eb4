"""POST /v1/embeddings on a server started with an encoder (BERT): OpenAI's schema, concurrent requests batched.

A request's inputs (a string, a list of strings, a list of token ids, or a list of those) are checked and tokenized
on the event loop, then queued as one job. Rank 0's engine thread (``serve.engine_loop.EngineThread``, which steps
an ``EmbedQueue`` as it steps a causal LM's scheduler) takes every job waiting, up to ``max_sequences`` inputs, and
runs them as one ``RankEngine.embed`` (the encoder batches them longest first): requests that arrive together
share forwards. An input longer than the model's limit is a 400 (``context_length_exceeded``) unless the request
says ``"truncate": true`` (tpinfer's extension; usage then counts the tokens kept). ``encoding_format: "base64"``
is the float32 little-endian bytes, as OpenAI's client decodes them; ``dimensions`` other than the model's is
refused (no Matryoshka truncation).
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from tpinfer.engine import messages
from tpinfer.serve.handlers import APIError, parse
from tpinfer.serve.schemas import _Request

if TYPE_CHECKING:
    from tpinfer.engine.runtime import RankEngine
    from tpinfer.serve.app import ServerState

MAX_INPUTS = 2048  # OpenAI's limit of inputs per request


class EmbeddingRequest(_Request):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None  # accepted and ignored
    truncate: bool = False  # tpinfer's extension: cut inputs longer than the model's limit instead of a 400


@dataclass
class EmbedJob:
    sequences: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    arrival: float = field(default_factory=time.monotonic)


class EmbedQueue:
    """An encoder's scheduler for the engine thread: waiting jobs, each step a batch of them on every rank."""

    def __init__(self, engine: RankEngine, max_sequences: int, max_waiting: int) -> None:
        self.engine, self.max_sequences, self.max_waiting = engine, max_sequences, max_waiting
        self.max_seq_len = engine.model.max_seq_len
        self.replica = 0
        self.steps = 0
        self._jobs: deque[EmbedJob] = deque()
        self._running = 0
        self._cond = threading.Condition()
        self._interrupted = False

    @property
    def num_waiting(self) -> int:
        return len(self._jobs)

    @property
    def num_running(self) -> int:
        return self._running

    def add(self, job: EmbedJob) -> bool:
        """Queue ``job``; False when the queue is full (the caller answers 503)."""
        with self._cond:
            if len(self._jobs) >= self.max_waiting:
                return False
            self._jobs.append(job)
            self._cond.notify()
        return True

    def step(self) -> bool:
        """Embed every waiting job up to ``max_sequences`` inputs (at least one job) in one cross-rank operation."""
        with self._cond:
            jobs, count = [], 0
            while self._jobs and (not jobs or count + len(self._jobs[0].sequences) <= self.max_sequences):
                job = self._jobs.popleft()
                jobs.append(job)
                count += len(job.sequences)
            self._running = count
        if not jobs:
            return False
        try:
            vectors = self.engine.embed([s for job in jobs for s in job.sequences])
        except Exception as exc:  # a collective failed: every job of the batch fails, then the server
            for job in jobs:
                job.loop.call_soon_threadsafe(_settle, job.future, None, exc)
            raise
        finally:
            self._running = 0
        start = 0
        for job in jobs:
            mine = vectors[start : start + len(job.sequences)]
            start += len(job.sequences)
            job.loop.call_soon_threadsafe(_settle, job.future, mine, None)
        self.steps += 1
        return True

    def wait_for_work(self, timeout: float) -> bool:
        with self._cond:
            if not self._jobs and not self._interrupted:
                self._cond.wait(timeout)
            return bool(self._jobs)

    def heartbeat(self) -> None:
        """An empty operation that keeps idle workers inside their collective timeout."""
        messages.send(self.engine.ctx, messages.Embed.of([]))

    def interrupt(self) -> None:
        with self._cond:
            self._interrupted = True
            self._cond.notify_all()

    def finish_in_flight(self) -> None:
        """Nothing stays in flight between steps."""


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:  # noqa: ANN001
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _inputs(req: EmbeddingRequest) -> list[str | list[int]]:
    given = req.input
    if isinstance(given, str) or (given and isinstance(given[0], int)):
        given = [given]  # type: ignore[list-item]
    if not given:
        raise APIError(400, "input: at least one input is needed", "input")
    if len(given) > MAX_INPUTS:
        raise APIError(400, f"input: at most {MAX_INPUTS} inputs per request, got {len(given)}", "input")
    return list(given)


def _token_ids(state: ServerState, queue: EmbedQueue, items: list[str | list[int]],
               truncate: bool) -> list[list[int]]:
    """Each input's token ids, as ``LLM.embed`` makes them, with OpenAI-style errors naming the input."""
    pooling = queue.engine.encoder.pooling
    limit, vocab = queue.max_seq_len, state.settings.vocab_size
    for i, item in enumerate(items):
        if not item:
            raise APIError(400, f"input[{i}] is empty", "input")
    cased = [(item.lower() if pooling.lower_case else item) if isinstance(item, str) else None for item in items]
    encoded = iter(state.tokenizer.encode_many([text for text in cased if text is not None]))  # one batch call
    out = []
    for i, (item, text) in enumerate(zip(items, cased, strict=True)):
        if text is not None:
            ids = next(encoded)
            if truncate and len(ids) > limit:
                ids = state.tokenizer.encode(text, max_length=limit)
        else:
            ids = list(item)
            if min(ids) < 0 or max(ids) >= vocab:
                raise APIError(400, f"input[{i}]: token ids must be in [0, {vocab})", "input")
            if truncate:
                ids = ids[:limit]
        if len(ids) > limit:
            raise APIError(400, f"This model's maximum input length is {limit} tokens; input[{i}] has {len(ids)}. "
                           "Shorten it, or send \"truncate\": true to cut it.", "input", "context_length_exceeded")
        out.append(ids)
    return out


async def create_embedding(raw: bytes, state: ServerState) -> Response:
    queue = state.embed_queue
    if queue is None:
        raise APIError(400, f"this server runs a causal LM ({state.model_name}); /v1/embeddings needs an encoder "
                       "model (bert)", "model", "model_not_supported")
    req = parse(EmbeddingRequest, raw)
    state.check_model(req.model)
    dimension = state.settings.embedding_dimension
    if req.dimensions is not None and req.dimensions != dimension:
        raise APIError(400, f"dimensions: this model's embeddings have {dimension} dimensions; other sizes are "
                       "not supported", "dimensions")
    sequences = _token_ids(state, queue, _inputs(req), req.truncate)
    state._check_available()
    loop = asyncio.get_running_loop()
    job = EmbedJob(sequences, loop, loop.create_future())
    if not queue.add(job):
        raise APIError(503, f"the server is at capacity ({queue.max_waiting} requests waiting); retry later",
                       code="queue_full")
    try:
        vectors = await job.future
    except Exception as exc:
        state.metrics.request("error")
        raise APIError(500, f"the inference engine failed: {exc}") from None
    tokens = sum(map(len, sequences))
    state.metrics.finished(tokens, time.monotonic() - job.arrival)
    state.metrics.request("success")
    data = [{"object": "embedding", "index": i, "embedding": _encode(v.numpy(), req.encoding_format)}
            for i, v in enumerate(vectors)]
    return JSONResponse({"object": "list", "data": data, "model": state.model_name,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()
