"""From generated tokens to text deltas, and from the engine thread to a request's event loop.

``ChoiceOutput`` is the scheduler's ``SequenceOutput`` for one choice of one request: it runs on the
engine thread, detokenizes incrementally, applies stop strings (holding back text that could be the
start of one, so a stop string is never streamed), and pushes ``Delta`` events to the request's
``RequestStream``, which the HTTP handler reads on the event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from tpinfer.engine.scheduler import Sequence
from tpinfer.serve.metrics import Metrics
from tpinfer.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """The text of a growing token list, one delta per token, without decoding everything each time.

    It decodes a short window [prefix, end) and subtracts the text of [prefix, read): tokenizers that
    drop a leading space at the start of a decode are handled, and a delta that ends inside a UTF-8
    character (decoded as U+FFFD) waits for the token that completes it.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back, complete or not (the sequence has ended)."""
        before = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(before) :] if len(text) > len(before) else ""


@dataclass
class TokenLogprob:
    token: str
    logprob: float | None  # None: an echoed prompt's first token (nothing comes before it)
    top: list[tuple[str, float]] | None


@dataclass
class Delta:
    """New text (and logprobs) of one choice; ``finish_reason`` set on its last delta."""

    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_tokens: int = 0  # generated so far


@dataclass
class Failure:
    message: str


class Mailbox:
    """Events from the engine thread to one event loop, handed over with one wakeup per batch.

    The engine thread's own events (tokens) wait for ``flush``, which the scheduler calls right after it has sent
    the next step's message (``Scheduler.after_send``): the loop then renders and writes them while the forward
    runs, which holds no GIL, instead of between two steps, where the engine thread would wait for the GIL to
    send the message the other ranks are waiting for (16 clients, bfloat16 at TP=2: that send took 1.15 ms a
    step; see docs/performance.md). Other events (a failure) go at once, after whatever waits before them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deferring: bool) -> None:
        self.loop = loop
        self.deferring = deferring  # whether a scheduler flushes after each step message (else deferred go at once)
        self._events: list[tuple[asyncio.Queue, Delta | Failure]] = []
        self._scheduled = False
        self._lock = threading.Lock()

    def put(self, queue: asyncio.Queue, event: Delta | Failure, defer: bool = False) -> None:
        """Any thread; with ``defer`` (the engine thread's tokens), delivered at the next ``flush``."""
        with self._lock:
            self._events.append((queue, event))
            if (defer and self.deferring) or self._scheduled:
                return
            self._scheduled = True
        self._schedule()

    def flush(self) -> None:
        """Deliver whatever waits (any thread)."""
        with self._lock:
            if not self._events or self._scheduled:
                return
            self._scheduled = True
        self._schedule()

    def _schedule(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop is closed: the server is exiting and nobody listens
            with self._lock:
                self._events.clear()
                self._scheduled = False

    def _deliver(self) -> None:
        with self._lock:
            events, self._events = self._events, []
            self._scheduled = False
        for queue, event in events:
            queue.put_nowait(event)


class RequestStream:
    """One HTTP request's choices: the engine thread pushes events, the handler iterates them."""

    def __init__(self, mailbox: Mailbox, prompt_tokens: int) -> None:
        self.id = uuid.uuid4().hex
        self.created = int(time.time())
        self.arrival = time.monotonic()
        self.prompt_tokens = prompt_tokens
        self.sequences: list[Sequence] = []
        self.queue: asyncio.Queue[Delta | Failure] = asyncio.Queue()
        self._mailbox = mailbox  # the event loop's, whose handler reads ``queue``

    def push(self, event: Delta | Failure, defer: bool = False) -> None:
        """Any thread; ``defer``: the engine thread's, delivered after its next step message (``Mailbox``)."""
        self._mailbox.put(self.queue, event, defer)

    def fail(self, message: str) -> None:
        self.push(Failure(message))

    def cancel(self) -> None:
        """The client left: the scheduler frees these sequences' slots at its next step."""
        for seq in self.sequences:
            seq.cancelled = True

    async def events(self) -> AsyncIterator[list[Delta | Failure]]:
        """Batches of ready events until every choice has finished or the request failed."""
        remaining = len(self.sequences)
        while remaining:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            yield batch
            if any(isinstance(event, Failure) for event in batch):
                return
            remaining -= sum(1 for event in batch if event.finish_reason is not None)


class ChoiceOutput:
    """One choice's text. Streaming: a delta per token, like vLLM (its text may be empty while a character or
    a possible stop string is incomplete), so clients see every token's timing; otherwise one delta at the end."""

    def __init__(self, stream: RequestStream, index: int, tokenizer: Tokenizer, metrics: Metrics,
                 stop: tuple[str, ...] = (), logprobs: bool = False, streaming: bool = False) -> None:
        self.stream, self.index, self.metrics = stream, index, metrics
        self.tokenizer = tokenizer
        self.detokenizer = IncrementalDetokenizer(tokenizer.decode)
        self.stop = stop
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.logprobs, self.streaming = logprobs, streaming
        self.text = ""
        self.num_tokens = 0
        self._sent = 0  # characters of text already pushed
        self._pending: list[TokenLogprob] = []
        self._last_token_time: float | None = None
        self._stopped = False

    def add(self, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None) -> bool:
        if self._stopped:
            return True
        now = time.monotonic()
        if self._last_token_time is None:
            self.metrics.first_token(now - self.stream.arrival)
        else:
            self.metrics.next_token(now - self._last_token_time)
        self._last_token_time = now
        self.num_tokens += 1
        before = len(self.text)
        self.text += self.detokenizer.add(token_id)
        if self.stop and len(self.text) > before:
            self._stopped = self._cut_at_stop(before)
        if self.logprobs and logprob is not None:
            self._pending.append(TokenLogprob(self._token_text(token_id), logprob,
                                              [(self._token_text(i), lp) for i, lp in top or ()]))
        if self.streaming and not self._stopped:
            self._push(None)
        return self._stopped

    def prompt(self, token_ids: list[int], logprobs: list[float | None] | None,
               top: list[list[tuple[int, float]] | None] | None) -> None:
        """Echo: the prompt's text (and its tokens' logprobs) as this choice's first delta; stop strings and the
        completion's token count leave it out."""
        entries = []
        if self.logprobs and logprobs is not None:
            entries = [TokenLogprob(self._token_text(t), lp, None if alt is None else
                                    [(self._token_text(i), v) for i, v in alt])
                       for t, lp, alt in zip(token_ids, logprobs, top or [None] * len(token_ids), strict=True)]
        self.stream.push(Delta(self.index, self.tokenizer.decode(token_ids), entries, None, 0), defer=True)

    def finish(self, reason: str) -> None:
        if not self._stopped:
            before = len(self.text)
            self.text += self.detokenizer.flush()
            if self.stop and len(self.text) > before:
                self._cut_at_stop(before)
        self._push(reason)

    def _cut_at_stop(self, before: int) -> bool:
        """Cut the text at the first stop string that the newest text completes; True if one did."""
        start = max(0, before - self.longest_stop + 1)
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)

    def _push(self, finish_reason: str | None) -> None:
        # While running, hold back text that could be the start of a stop string.
        end = len(self.text) if finish_reason else max(self._sent, len(self.text) - max(0, self.longest_stop - 1))
        text = self.text[self._sent : end]  # may be "" (a partial character, or held back): still one delta
        self._sent = end
        logprobs, self._pending = self._pending, []
        self.stream.push(Delta(self.index, text, logprobs, finish_reason, self.num_tokens), defer=True)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
