"""Continuous batching on rank 0, and the step every rank runs.

Each step, rank 0 admits waiting sequences into free KV-cache slots and sends every rank one message
(``messages.Step``): the prompts of the newly admitted sequences as (slot, token ids), and the last token of every
running one as (slot, token id, position).

Every rank then runs the same two forwards (``run_step``): the prompts of the newly admitted sequences
(each from position 0, right-padded to the longest) and the running sequences' last tokens. Only slots,
token ids and positions cross ranks. Rank 0 samples each row with the sequence's own parameters and generator,
checks its stop conditions and hands the token to the sequence's ``output``. Finished and cancelled
sequences give their slots back before the next step, and waiting ones take them: a short request
joins and leaves a running batch instead of queueing behind a long one.

Padding is harmless: a pad token writes the KV cache of its own slot at a position past its prompt,
which that sequence's decodes overwrite before any query can read it. A batch of rows computes each
row as it would alone up to floating-point summation order, so greedy output matches the same request
sent alone wherever the top two logits are not within rounding of each other.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tpinfer.engine import messages
from tpinfer.engine.kv_cache import Batch
from tpinfer.engine.runtime import RankEngine
from tpinfer.engine.sampling import SamplingParams, make_generator, sample

PREFILL_TOKENS_PER_STEP = 2048  # padded prompt tokens per step: a burst of long prompts is admitted over several steps


class SequenceOutput(Protocol):
    """Where a sequence's tokens go (the server detokenizes and streams them). Called on rank 0's engine thread."""

    def add(self, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None) -> bool:
        """Take one generated token; return True to stop the sequence here (e.g. a stop string appeared)."""
        ...

    def finish(self, reason: str) -> None:
        """The sequence ended: "stop" (end-of-sequence token or stop string) or "length" (max tokens)."""
        ...


@dataclass(eq=False)
class Sequence:
    """One generation: a prompt, how to sample it, and where its tokens go."""

    prompt_ids: list[int]
    params: SamplingParams
    output: SequenceOutput
    top_logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the k likeliest
    cancelled: bool = False  # set from any thread (the client left); the slot is freed at the next step
    slot: int = -1
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    generator: torch.Generator | None = None

    @property
    def last_position(self) -> int:
        """Position of the newest token, the one the next decode feeds in."""
        return len(self.prompt_ids) + len(self.token_ids) - 1


@torch.inference_mode()
def run_step(engine: RankEngine, message: messages.Step) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Every rank: the forwards of one step message. Full logits (rows, V) of the prefills and of the decodes.

    Workers discard the logits; they compute them because the vocabulary-parallel head's all-gather is a
    collective every rank must join.
    """
    model, forward, cache, device = engine.model, engine.forward, engine.generator.cache, engine.ctx.device
    prefill_logits = decode_logits = None
    if message.prefill:
        slots, prompts = (list(column) for column in zip(*message.prefill, strict=True))
        batch = Batch.build(prompts, [0] * len(prompts), slots, device)
        prefill_logits = engine.to_first(model.gather_logits(forward(batch, cache)), len(prompts))
    if message.decode:
        slots, tokens, positions = (list(column) for column in zip(*message.decode, strict=True))
        batch = Batch.build([[t] for t in tokens], positions, slots, device)
        decode_logits = engine.to_first(model.gather_logits(forward(batch, cache)), len(tokens))
    return prefill_logits, decode_logits


class Scheduler:
    """Rank 0: a fixed number of KV-cache slots, a bounded waiting queue, and one step at a time.

    ``add`` may be called from any thread; ``step`` and ``heartbeat`` only from the engine thread, the one
    thread that issues collectives.
    """

    def __init__(self, engine: RankEngine, max_num_seqs: int, max_waiting: int,
                 prefill_tokens_per_step: int = PREFILL_TOKENS_PER_STEP) -> None:
        cache = engine.generator.cache
        if cache.max_seqs < max_num_seqs:
            raise ValueError(f"the KV cache has {cache.max_seqs} slots, fewer than max_num_seqs={max_num_seqs}")
        self.engine = engine
        self.max_num_seqs, self.max_waiting = max_num_seqs, max_waiting
        self.max_seq_len = min(cache.max_seq_len, engine.model.max_seq_len)
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.eos_token_ids = frozenset(engine.generator.eos_token_ids)
        self.recompute_length = engine.model.recompute_length
        self.steps = 0
        self._free = list(range(max_num_seqs - 1, -1, -1))  # pop() hands out the lowest slot
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._cond = threading.Condition()
        self._interrupted = False

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def add(self, sequences: list[Sequence]) -> bool:
        """Queue sequences (all or none); False when running + waiting would exceed the slots plus the queue."""
        for seq in sequences:
            if not seq.prompt_ids or len(seq.prompt_ids) + seq.params.max_new_tokens > self.max_seq_len:
                raise ValueError(f"prompt of {len(seq.prompt_ids)} tokens + {seq.params.max_new_tokens} new tokens "
                                 f"does not fit the maximum sequence length {self.max_seq_len}")
        with self._cond:
            if len(self._waiting) + len(self._running) + len(sequences) > self.max_num_seqs + self.max_waiting:
                return False
            self._waiting.extend(sequences)
            self._cond.notify()
        return True

    def wait_for_work(self, timeout: float) -> bool:
        """Block (no polling) until a sequence waits, ``interrupt`` is called, or ``timeout`` passes."""
        with self._cond:
            ready = self._cond.wait_for(lambda: self._waiting or self._interrupted, timeout)
            self._interrupted = False
            return bool(ready)

    def interrupt(self) -> None:
        with self._cond:
            self._interrupted = True
            self._cond.notify()

    def heartbeat(self) -> None:
        """An empty step: idle workers wait in a broadcast whose timeout is the collective timeout."""
        messages.send(self.engine.ctx.control, messages.Step())

    def step(self) -> bool:
        """Admit, run one step on every rank, sample, retire. False when there was nothing to run."""
        self._retire()
        decoding = list(self._running)
        admitted = self._admit()
        if not admitted and not decoding:
            return False
        # A sequence reaching the model's recompute length runs again whole, as a prefill (see Phi-3).
        again = [seq for seq in decoding if seq.last_position + 1 == self.recompute_length]
        if again:
            decoding = [seq for seq in decoding if seq not in again]
        message = messages.Step([(seq.slot, seq.prompt_ids) for seq in admitted]
                                + [(seq.slot, seq.prompt_ids + seq.token_ids) for seq in again],
                                [(seq.slot, seq.token_ids[-1], seq.last_position) for seq in decoding])
        messages.send(self.engine.ctx.control, message)  # the workers' whole input for this step
        prefill_logits, decode_logits = run_step(self.engine, message)
        if prefill_logits is not None:
            self._advance(admitted + again, prefill_logits)
        if decode_logits is not None:
            self._advance(decoding, decode_logits)
        self._retire()
        self.steps += 1
        return True

    def _admit(self) -> list[Sequence]:
        """Waiting sequences into free slots, first come first served, while the padded prefill fits the budget."""
        admitted: list[Sequence] = []
        width = 0
        with self._cond:
            if any(seq.cancelled for seq in self._waiting):
                self._waiting = deque(seq for seq in self._waiting if not seq.cancelled)
            while self._waiting and self._free:
                seq = self._waiting[0]
                wider = max(width, len(seq.prompt_ids))
                if admitted and wider * (len(admitted) + 1) > self.prefill_tokens_per_step:
                    break
                self._waiting.popleft()
                seq.slot = self._free.pop()
                seq.generator = make_generator(seq.params.seed, self.engine.ctx.device)
                width = wider
                admitted.append(seq)
            self._running.extend(admitted)  # counted as running from now on (``add`` checks capacity)
        return admitted

    def _retire(self) -> None:
        """Give back the slots of finished and cancelled sequences."""
        if not any(seq.finish_reason or seq.cancelled for seq in self._running):
            return
        with self._cond:
            keep = []
            for seq in self._running:
                if seq.finish_reason or seq.cancelled:
                    self._free.append(seq.slot)
                else:
                    keep.append(seq)
            self._free.sort(reverse=True)
            self._running = keep

    def _advance(self, sequences: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token per row of (B, V) ``logits`` with each sequence's parameters, then check its stops."""
        tokens = self._sample(sequences, logits)
        for row, (seq, token) in enumerate(zip(sequences, tokens, strict=True)):
            if seq.cancelled:
                continue
            logprob, top = None, None
            if seq.top_logprobs is not None:
                logprobs = logits[row].log_softmax(-1)
                logprob = float(logprobs[token])
                if seq.top_logprobs > 0:
                    values, ids = logprobs.topk(seq.top_logprobs)
                    top = list(zip(ids.tolist(), values.tolist(), strict=True))
            seq.token_ids.append(token)
            stop_string = seq.output.add(token, logprob, top)
            params = seq.params
            if stop_string or token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
                seq.finish_reason = "stop"
            elif len(seq.token_ids) >= params.max_new_tokens:
                seq.finish_reason = "length"
            else:
                continue
            seq.output.finish(seq.finish_reason)

    @staticmethod
    def _sample(sequences: list[Sequence], logits: torch.Tensor) -> list[int]:
        greedy = logits.argmax(-1).tolist()  # one call for every greedy row
        return [
            greedy[row] if seq.params.greedy else int(sample(logits[row : row + 1], seq.params, seq.generator)[0])
            for row, seq in enumerate(sequences)
        ]
