"""Continuous batching on rank 0, and the step every rank runs.

Each step, rank 0 admits waiting sequences into free KV-cache slots and sends every rank one message
(``messages.Step``): prefill chunks as (slot, token ids) with their first positions, and the last token of every
running sequence as (slot, token id, position).

Every rank then runs the same two forwards (``run_step``): the prefill chunks packed into one row (``Batch.packed``:
no padding; attention per sequence over its own slot) and the running sequences' last tokens. Only slots, token ids
and positions cross ranks. Rank 0 samples each row with the sequence's own parameters and generator, checks its stop
conditions and hands the token to the sequence's ``output``. Finished and cancelled sequences give their slots back
before the next step, and waiting ones take them: a short request joins and leaves a running batch instead of
queueing behind a long one.

**Prefill under a token budget** (``max_num_batched_tokens``, vLLM's name): a step prefills at most that many prompt
tokens, first the rest of prompts already being prefilled, then newly admitted ones, first come first served; a
prompt that does not fit is chunked and continues next step. Every step also decodes every running sequence, so a
burst of arrivals is prefilled over a few steps (the first of them streaming after the first step) and a long prompt
never stalls the running streams. Rows that end a prompt are sampled; a chunk's row only writes the cache.

**Prefix caching.** A slot's keys and values stay valid after its sequence ends, until the slot is taken again. A
new prompt starts from the longest prefix some slot holds (all of it but its last token, whose logits it needs): a
free slot holding it is taken over as it is; a running sequence's prefix (at least PREFIX_MIN_TOKENS) is copied into
the new slot by every rank before the step's forwards (``Step.copies``; a few hundred KiB per layer, against the
prefix's whole prefill). A prompt that shares more with a prompt this very step prefills waits one step for it. Free
slots that cache nothing are taken first, then the one freed longest ago. Off where a layer keeps a ring (its old
positions are overwritten) or the rope tables depend on the length (Phi-3's longrope), and for echo requests that
want every prompt position's logits.

With pipeline stages (``pp > 1``) rank 0 keeps up to ``pp`` micro-batches in flight: it sends one step, runs its
own stage of it and hands the activations on, then starts the next micro-batch while later stages work on the first;
it takes a micro-batch's logits back (from the last stage) only when it has nothing more to start. Each running
sequence is in at most one micro-batch at a time, and a micro-batch takes at most 1/pp of the running sequences,
so every stage has a different micro-batch to work on. Time rank 0 spends waiting for logits with nothing else to
start is the pipeline's bubble as rank 0 sees it (``bubble_s``). Every stage runs the step messages in the order
sent, so a copy always reads positions an earlier message wrote.

Models whose rope tables depend on the length prefill whole prompts, right-padded to the longest of the step.
Padding is harmless: a pad token writes the KV cache of its own slot at a position past its prompt, which that
sequence's decodes overwrite before any query can read it. A batch computes each sequence as it would alone up to
floating-point summation order, so greedy output matches the same request sent alone wherever the top two logits are
not within rounding of each other.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tpinfer.engine import messages
from tpinfer.engine.kv_cache import Batch
from tpinfer.engine.runtime import RankEngine
from tpinfer.engine.sampling import SamplingParams, local_candidates, make_generator, merge_candidates, sample
from tpinfer.models.family import CAUSAL_LM

# Prompt tokens prefilled per step (vLLM's max_num_batched_tokens): prompts are packed and chunked to it, so a burst of
# arrivals is prefilled over several steps, each with the running sequences' decodes, the first of them getting their
# first tokens while the rest wait; a long prompt does not stall the running streams.
MAX_NUM_BATCHED_TOKENS = 128
PREFIX_MIN_TOKENS = 16  # a prefix shorter than this is computed again rather than copied from another slot
# Where a step's prompt tokens can ride in its decode forward (fold_prefill), the step prefills only as many as keep it
# within the kernels' rows, if that leaves at least this many; otherwise the whole budget, in a forward of its own.
FOLD_MIN_TOKENS = 16


class SequenceOutput(Protocol):
    """Where a sequence's tokens go (the server detokenizes and streams them). Called on rank 0's engine thread."""

    def add(self, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None) -> bool:
        """Take one generated token; return True to stop the sequence here (e.g. a stop string appeared)."""
        ...

    def finish(self, reason: str) -> None:
        """The sequence ended: "stop" (end-of-sequence token or stop string) or "length" (max tokens)."""
        ...

    def prompt(self, token_ids: list[int], logprobs: list[float | None] | None,
               top: list[list[tuple[int, float]] | None] | None) -> None:
        """An echoing sequence's prompt, before its first token: per prompt token its logprob (None for the first)
        and likeliest alternatives, or None when the request asked for no logprobs."""
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
    in_flight: bool = False  # in a micro-batch whose logits have not come back yet (pipeline stages)
    # Echo (completions' ``echo``): the prompt goes to ``output.prompt`` first, with every prompt token's logprob
    # and its ``top_logprobs`` likeliest alternatives when that is not None; ``generate`` False: nothing more.
    echo: bool = False
    generate: bool = True
    computed: int = 0  # leading positions whose keys and values the steps sent so far write into the slot

    @property
    def prefilling(self) -> bool:
        """Part of the prompt is still to be prefilled (a chunked prefill in progress)."""
        return self.computed < len(self.prompt_ids)

    @property
    def prompt_logprobs(self) -> bool:
        """Whether the step must bring back every position's logits of this prompt (echo with logprobs)."""
        return self.echo and self.top_logprobs is not None

    @property
    def last_position(self) -> int:
        """Position of the newest token, the one the next decode feeds in."""
        return len(self.prompt_ids) + len(self.token_ids) - 1


Logits = tuple[torch.Tensor | None, torch.Tensor | None, dict[int, torch.Tensor]]


@torch.inference_mode()
def run_stage(engine: RankEngine, message: messages.Step, times: dict[str, float] | None = None) -> Logits:
    """Every rank: this rank's part of the forwards of one step message. On the last pipeline stage, full logits
    (rows, V) of the prefills and of the decodes (already on their way to rank 0 from the sampler), and by slot the
    (T, V) logits of every position of the ``echo`` prompts; None (and nothing) elsewhere. ``times`` accumulates the
    seconds of the prefill and decode forwards (logits gathered included).

    Workers discard the logits; they compute them because the vocabulary-parallel head's all-gather is a
    collective every rank must join.
    """
    model, forward, cache, device = engine.model, engine.forward, engine.generator.cache, engine.ctx.device
    prefill_logits = decode_logits = None
    echo_logits: dict[int, torch.Tensor] = {}
    start = time.perf_counter()
    for source, target, length in message.copies:
        cache.copy_prefix(source, target, length)
    if fold_prefill(engine, message):
        return _run_folded(engine, message, times, start)
    if message.prefill:
        echo = set(message.echo)
        plain = [(s, p, message.start(i)) for i, (s, p) in enumerate(message.prefill) if s not in echo]
        if plain:
            slots, prompts, starts = (list(column) for column in zip(*plain, strict=True))
            build = Batch.packed if len(plain) > 1 and model.packable else Batch.build
            batch = build(prompts, starts, slots, device)
            prefill_logits = model.gather_logits(forward(batch, cache))
        if echo:  # every position's logits of these prompts (one at a time: a (T, vocab) tensor each)
            rows = {}
            for slot, prompt in message.prefill:
                if slot in echo:
                    batch = Batch.build([prompt], [0], [slot], device, all_logits=True)
                    full = model.gather_logits(forward(batch, cache))
                    if full is not None:
                        echo_logits[slot] = full[0]
                    rows[slot] = None if full is None else full[0, -1]
            if prefill_logits is not None or all(r is not None for r in rows.values()):
                last = iter(prefill_logits if prefill_logits is not None else ())
                prefill_logits = torch.stack([rows[s] if s in echo else next(last) for s, _ in message.prefill])
        prefill_logits = _send_logits(engine, prefill_logits)
    if times is not None:
        now = time.perf_counter()
        times["prefill"] += now - start
        start = now
    if message.decode:
        slots, tokens, positions = (list(column) for column in zip(*message.decode, strict=True))
        batch = Batch.build([[t] for t in tokens], positions, slots, device)
        decode_logits = _decode_logits(engine, message, forward(batch, cache))
    if times is not None:
        times["decode"] += time.perf_counter() - start
    return prefill_logits, decode_logits, echo_logits


def _decode_logits(engine: RankEngine, message: messages.Step, local: torch.Tensor | None) -> torch.Tensor | None:
    """The decode rows' local logits as rank 0 samples them (candidates where the message asks for them, else
    full logits), on their way to rank 0 from the sampler."""
    full = (_candidates(engine, local, message.candidates, message.logprobs) if message.candidates
            else engine.model.gather_logits(local))
    return _send_logits(engine, full)


def fold_prefill(engine: RankEngine, message: messages.Step) -> bool:
    """Whether this step's prompt tokens ride in its decode forward, one row each (``_run_folded``): where the
    native decode kernels take the step whole (every row one new token, few enough rows), on one pipeline stage,
    for prompts that want only their last position's logits, and no layer keeps a ring (a chunk's later positions
    would overwrite what its earlier ones attend to).

    The kernels write every row's keys and values into the cache before any row attends, and each row attends its
    slot's positions up to its own, so a prompt's consecutive positions in one step attend causally, as a prefill
    does. Two forwards a step (the packed prompts through the model's layers, then the decodes through the
    kernels) become one, at the decodes' cost plus a row per prompt token. A short prompt had cost a forward of its
    own, 28 ms for a few tokens of the 250M Llama at TP=2 in bfloat16 against 18 ms for a one-row decode step; folded,
    17-20 ms (``benchmarks/prefill_cost.py``).
    """
    if not message.prefill or message.echo:
        return False
    rows = len(message.decode) + sum(len(tokens) for _, tokens in message.prefill)
    return rows <= engine.fold_rows


def _run_folded(engine: RankEngine, message: messages.Step, times: dict[str, float] | None, start: float) -> Logits:
    """``run_stage`` for a step ``fold_prefill`` accepts: the decodes' rows first, then every prompt token as a row
    of its own at its position; the head runs on the decodes' rows and each prompt's last row only. The step's time
    counts as decode."""
    model, device = engine.model, engine.ctx.device
    slots, tokens, positions = map(list, zip(*message.decode, strict=True)) if message.decode else ([], [], [])
    last = []
    for i, (slot, prompt) in enumerate(message.prefill):
        first = message.start(i)
        slots += [slot] * len(prompt)
        tokens += prompt
        positions += range(first, first + len(prompt))
        last.append(len(tokens) - 1)
    batch = Batch.build([[t] for t in tokens], positions, slots, device)
    hidden = engine.forward.decode(batch, engine.generator.cache)
    prefill_logits = _send_logits(engine, model.gather_logits(model.logits(hidden[last])))  # as run_stage: first
    n = len(message.decode)
    decode_logits = _decode_logits(engine, message, model.logits(hidden[:n])) if n else None
    if times is not None:
        times["decode"] += time.perf_counter() - start
    return prefill_logits, decode_logits, {}


def _candidates(engine: RankEngine, local_logits: torch.Tensor | None, k: int, lse: bool) -> torch.Tensor | None:
    """Every row's k likeliest tokens over the whole vocabulary and its log-sum-exp (only with ``lse``: a row
    wants logprobs), from each rank's shard, as one (B, 2k + 1) float32 tensor on the last stage: values (largest
    first, ties by lower id), ids, log-sum-exp."""
    if local_logits is None:
        return None
    head, tp = engine.model.lm_head, engine.ctx.tp_size
    packed = local_candidates(local_logits, head.start, min(head.length, head.vocab_size - head.start), k, lse)
    sharded = tp > 1 and head.length < head.vocab_size
    parts = engine.ctx.comm.all_gather(packed, dim=0).chunk(tp, dim=0) if sharded else [packed]
    values, ids, lse = merge_candidates(list(parts), k)
    return torch.cat([values, ids.float(), lse[:, None]], dim=-1)


def _send_logits(engine: RankEngine, logits: torch.Tensor | None) -> torch.Tensor | None:
    pipe = engine.ctx.pipe
    if pipe is not None and engine.ctx.rank == pipe.sampler != 0:
        pipe.send(logits, 0)
    return logits


def take_logits(pipe, vocab: int, message: messages.Step) -> Logits:  # noqa: ANN001
    """Rank 0: the logits of a step message, from the sampler (last stage) of the replica ``pipe`` leads to (never
    echo logits: the server takes echo requests only where rank 0 is the sampler)."""
    recv = lambda rows: pipe.recv(torch.empty((rows, vocab), dtype=torch.float32, device=pipe.device),  # noqa: E731
                                  pipe.sampler)
    prefill = recv(len(message.prefill)) if message.prefill else None  # in the order the sampler sends them
    decode = None
    if message.decode:
        decode = pipe.recv(torch.empty((len(message.decode), 2 * message.candidates + 1), dtype=torch.float32,
                                       device=pipe.device), pipe.sampler) if message.candidates else recv(len(message.decode))
    return prefill, decode, {}


def run_step(engine: RankEngine, message: messages.Step, times: dict[str, float] | None = None) -> Logits:
    """Every rank: one step message whole. Full logits on rank 0 (and the last stage); None elsewhere."""
    logits = run_stage(engine, message, times)
    pipe = engine.ctx.pipe
    if pipe is None or pipe.sampler == 0:
        return logits
    return take_logits(pipe, engine.config.vocab_size, message) if engine.ctx.rank == 0 else (None, None, {})


class Scheduler:
    """Rank 0: a fixed number of KV-cache slots, a bounded waiting queue, and one step at a time.

    ``add`` may be called from any thread; ``step`` and ``heartbeat`` only from the engine thread, the one
    thread that issues collectives. With data-parallel replicas rank 0 runs one scheduler (and one engine thread) per
    replica; ``replica`` > 0 drives ranks rank 0 is not one of: it sends their step messages and takes their logits
    back, and computes nothing itself (every replica has the same model, limits and cache shape as rank 0's).
    """

    def __init__(self, engine: RankEngine, max_num_seqs: int, max_waiting: int,
                 max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS, replica: int = 0,
                 prefix_caching: bool = True) -> None:
        engine.require(CAUSAL_LM, "the server's continuous batching")
        cache = engine.generator.cache
        if cache.max_seqs < max_num_seqs:
            raise ValueError(f"the KV cache has {cache.max_seqs} slots, fewer than max_num_seqs={max_num_seqs}")
        self.engine = engine
        self.replica = replica
        self.local = replica == engine.ctx.dp_rank  # rank 0 computes this replica's first stage itself
        self.vocab_size = engine.config.vocab_size
        self.max_num_seqs, self.max_waiting = max_num_seqs, max_waiting
        self.max_seq_len = min(cache.max_seq_len, engine.model.max_seq_len)
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, not {max_num_batched_tokens}")
        self.max_num_batched_tokens = max_num_batched_tokens
        # Packing and chunking need rope tables that do not depend on a sequence's length (not Phi-3's longrope,
        # whose model recomputes a sequence at its switch length; that model prefills whole prompts, right-padded).
        self.chunked = engine.model.packable
        self.prefix_caching = prefix_caching and self.prefix_caching_supported(engine) is None
        self.eos_token_ids = frozenset(engine.generator.eos_token_ids)
        self.recompute_length = engine.model.recompute_length
        self.steps = 0
        self.generated_tokens = 0
        # Pipeline stages: micro-batches in flight, oldest first, as (step message, prefilled sequences, the rows
        # that end a prompt, decoded sequences).
        self.micro_batches = engine.ctx.pp_size
        self._in_flight: deque[tuple[messages.Step, list[Sequence], list[tuple[int, Sequence]], list[Sequence]]] = \
            deque()
        self.bubble_s = 0.0  # rank 0 waiting for a micro-batch's logits with nothing else to start
        self.busy_s = 0.0  # time in steps that ran something
        # Where a step's time goes on rank 0 (one-stage layouts): admitting, building and sending the step message
        # ("schedule"), the prefill and decode forwards, sampling and handing tokens to the outputs (detokenizing,
        # stop strings, streaming: "sample").
        self.phase_s = {"schedule": 0.0, "prefill": 0.0, "decode": 0.0, "sample": 0.0}
        self.prefill_tokens = 0  # prompt tokens prefilled, padding included
        self.folded_steps = 0  # steps whose prompt tokens rode in the decode forward (fold_prefill)
        self.prompt_tokens = 0  # prompt tokens of admitted sequences that could use the prefix cache
        self.prefix_hit_tokens = 0  # of them, the tokens taken from another slot or from the slot itself
        self._free = list(range(max_num_seqs - 1, -1, -1))  # pop() hands out the lowest slot
        # Prefix caching: a free slot's valid tokens (its keys and values still there), least recently freed first.
        self._cached: dict[int, list[int]] = {}
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._cond = threading.Condition()
        self._interrupted = False
        # Called on the engine thread right after each step message is sent, and after a step that leaves nothing
        # running: the server hands its streams the tokens of the steps before (``serve.outputs.Mailbox``).
        self.after_send: Callable[[], None] = _nothing

    @property
    def _results(self):  # noqa: ANN202
        """The pipe this replica's logits come back on (rank 0's own for its replica)."""
        ctx = self.engine.ctx
        return ctx.remotes[self.replica] if ctx.remotes else ctx.pipe

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @staticmethod
    def prefix_caching_supported(engine: RankEngine) -> str | None:
        """None where a prompt may start from another sequence's cached prefix; else why not."""
        if not engine.model.packable or engine.model.recompute_length is not None:
            return "the model's rope tables depend on the sequence length"
        if not engine.generator.cache.reusable:
            return "a sliding-window layer keeps only its window (a ring), so older positions are overwritten"
        return None

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
        messages.send(self.engine.ctx, messages.Step(), self.replica)

    def step(self) -> bool:
        """Admit, run one step on every rank, sample, retire. False when there was nothing to run."""
        start = time.perf_counter()
        ran = self._pipelined_step() if self.micro_batches > 1 else self._step()
        if ran:
            self.busy_s += time.perf_counter() - start
        if not self._running or self.micro_batches > 1:
            self.after_send()  # no step message may follow soon
        return ran

    def _step(self) -> bool:
        start = time.perf_counter()
        self._retire()
        decoding = [seq for seq in self._running if not seq.prefilling]
        chunks, copies = self._plan(decoding=len(decoding))
        if not chunks and not decoding:
            return False
        message, complete, decoding = self._message(chunks, copies, decoding)
        messages.send(self.engine.ctx, message, self.replica)  # the workers' whole input for this step
        self.after_send()
        phases = self.phase_s
        self.folded_steps += fold_prefill(self.engine, message)
        phases["schedule"] += time.perf_counter() - start
        if self.local:
            prefill_logits, decode_logits, echo_logits = run_step(self.engine, message, phases)
        else:
            forward = time.perf_counter()
            prefill_logits, decode_logits, echo_logits = take_logits(self._results, self.vocab_size, message)
            phases["decode" if decoding else "prefill"] += time.perf_counter() - forward
        start = time.perf_counter()
        self._take(complete, decoding, prefill_logits, decode_logits, echo_logits, message.candidates)
        self._retire()
        self.steps += 1
        phases["sample"] += time.perf_counter() - start
        return True

    def _message(self, chunks: list[tuple[Sequence, int]], copies: list[tuple[int, int, int]],
                 decoding: list[Sequence]) -> tuple[messages.Step, list[tuple[int, Sequence]], list[Sequence]]:
        """The step message of these prefill chunks (sequence, tokens) and decodes; the prefill rows that end a
        prompt (row, sequence: they get a token), and the decodes that stay decodes. Marks what the step computes."""
        # A sequence reaching the model's recompute length runs again whole, as a prefill (see Phi-3).
        again = [seq for seq in decoding if seq.last_position + 1 == self.recompute_length]
        if again:
            decoding = [seq for seq in decoding if seq not in again]
        prefill = [(seq.slot, seq.prompt_ids[seq.computed : seq.computed + n]) for seq, n in chunks]
        prefill += [(seq.slot, seq.prompt_ids + seq.token_ids) for seq in again]
        starts = [seq.computed for seq, _ in chunks] + [0] * len(again)
        message = messages.Step(prefill, [(seq.slot, seq.token_ids[-1], seq.last_position) for seq in decoding],
                                [seq.slot for seq, _ in chunks if seq.prompt_logprobs],
                                starts if any(starts) else [], copies, _candidates_for(decoding),
                                any(seq.top_logprobs is not None for seq in decoding))
        complete = []
        for row, (seq, n) in enumerate(chunks):
            seq.computed += n
            if not seq.prefilling:
                complete.append((row, seq))
        complete += [(len(chunks) + i, seq) for i, seq in enumerate(again)]
        for seq in again + decoding:
            seq.computed = seq.last_position + 1
        if prefill:
            self.prefill_tokens += (sum(len(p) for _, p in prefill) if self.chunked
                                    else len(prefill) * max(len(p) for _, p in prefill))
        return message, complete, decoding

    def _take(self, complete: list[tuple[int, Sequence]], decoding: list[Sequence], prefill_logits: torch.Tensor | None,
              decode_logits: torch.Tensor | None, echo_logits: dict[int, torch.Tensor], candidates: int = 0) -> None:
        """A step's logits back on rank 0: a token for each prompt it finished and for each decode."""
        if prefill_logits is not None and complete:
            finished = [seq for _, seq in complete]
            self._echo(finished, echo_logits)
            rows = [row for row, _ in complete]
            self._advance(finished, prefill_logits if len(rows) == len(prefill_logits) else prefill_logits[rows])
        if decode_logits is not None:
            self._advance(decoding, decode_logits, candidates)

    def _pipelined_step(self) -> bool:
        """Start a micro-batch if there is room and work for one; else take the oldest one's logits back."""
        self._retire()
        started = len(self._in_flight) < self.micro_batches and self._start_micro_batch()
        finished = bool(self._in_flight) and (not started or len(self._in_flight) >= self.micro_batches)
        if finished:
            self._finish_micro_batch(idle=not started)
            self._retire()
        self.steps += 1 if started else 0
        return started or finished

    def finish_in_flight(self) -> None:
        """Take back every micro-batch still in flight (before the workers are told to stop: a later stage must not
        be left sending logits nobody receives)."""
        while self._in_flight:
            self._finish_micro_batch(idle=False)
        self._retire()
        self.after_send()

    def _start_micro_batch(self) -> bool:
        ready = [seq for seq in self._running if not seq.in_flight and not seq.prefilling]
        share = -(-len(self._running) // self.micro_batches)  # at most 1/pp of the running sequences each
        decoding = ready[:share]
        chunks, copies = self._plan(max(0, share - len(decoding)) if self._in_flight else None)
        if not chunks and not decoding:
            return False
        message, complete, decoding = self._message(chunks, copies, decoding)
        for seq in [seq for seq, _ in chunks] + [seq for _, seq in complete] + decoding:
            seq.in_flight = True
        messages.send(self.engine.ctx, message, self.replica)
        self.after_send()
        if self.local:
            run_stage(self.engine, message)  # rank 0's stage; its activations are on their way to the next
        self._in_flight.append((message, [seq for seq, _ in chunks], complete, decoding))
        return True

    def _finish_micro_batch(self, idle: bool) -> None:
        message, chunked, complete, decoded = self._in_flight.popleft()
        start = time.perf_counter()
        prefill_logits, decode_logits, echo_logits = take_logits(self._results, self.vocab_size, message)
        if idle:
            self.bubble_s += time.perf_counter() - start
        for seq in chunked + [seq for _, seq in complete] + decoded:
            seq.in_flight = False
        self._take(complete, decoded, prefill_logits, decode_logits, echo_logits, message.candidates)

    def _plan(self, limit: int | None = None, decoding: int | None = None) -> tuple[list[tuple[Sequence, int]],
                                                                                   list[tuple[int, int, int]]]:
        """This step's prefill: (sequence, tokens) chunks within the token budget, first the prompts already being
        prefilled, then waiting sequences admitted into free slots (at most ``limit`` of them, at least one), first
        come first served; and the prefix copies (source slot, target slot, length) the admitted ones start from.
        With the step's ``decoding`` rows given, the budget is what keeps the step foldable (``step_budget``)."""
        budget = self.max_num_batched_tokens if decoding is None else self.step_budget(decoding)
        chunks: list[tuple[Sequence, int]] = []
        for seq in self._running:
            if seq.prefilling and not seq.in_flight and not seq.cancelled and budget > 0:
                n = min(len(seq.prompt_ids) - seq.computed, budget)
                chunks.append((seq, n))
                budget -= n
        copies: list[tuple[int, int, int]] = []
        admitted: list[Sequence] = []
        width = 0  # without chunking: the longest prompt, every row padded to it
        with self._cond:
            if any(seq.cancelled for seq in self._waiting):
                self._waiting = deque(seq for seq in self._waiting if not seq.cancelled)
            while self._waiting and self._free and budget > 0 and (limit is None or len(admitted) < max(1, limit)):
                seq = self._waiting[0]
                if not self.chunked:
                    wider = max(width, len(seq.prompt_ids))
                    if admitted and wider * (len(admitted) + 1) > self.max_num_batched_tokens:
                        break
                    width = wider
                reuse, source = self._match(seq) if self.prefix_caching and not seq.prompt_logprobs else (0, None)
                if reuse < len(seq.prompt_ids) - PREFIX_MIN_TOKENS and self._sooner(seq, reuse, chunks):
                    break  # a prompt this step computes has more of its prefix: wait one step and reuse it
                need = len(seq.prompt_ids) - reuse
                whole = seq.prompt_logprobs or not self.chunked  # all positions' logits need the prompt in one forward
                if whole and chunks and need > budget:
                    break
                self._waiting.popleft()
                if source is not None and source in self._cached:  # a free slot that holds the prefix: take it
                    self._free.remove(source)
                    seq.slot = source
                else:
                    seq.slot = self._take_free_slot()
                    if reuse:
                        copies.append((source, seq.slot, reuse))
                self._cached.pop(seq.slot, None)
                seq.computed = reuse  # positions taken from the prefix cache count as computed
                if self.prefix_caching and not seq.prompt_logprobs:
                    self.prompt_tokens += len(seq.prompt_ids)
                    self.prefix_hit_tokens += reuse
                seq.generator = make_generator(seq.params.seed, self.engine.ctx.device)
                n = need if whole else min(need, budget)
                chunks.append((seq, n))
                budget -= n
                admitted.append(seq)
            self._running.extend(admitted)  # counted as running from now on (``add`` checks capacity)
        return chunks, copies

    def step_budget(self, decoding: int) -> int:
        """Prompt tokens a step with ``decoding`` decode rows may prefill: where its prompt tokens can ride in the
        decode forward (``fold_prefill``), as many as keep the step within the kernels' rows (at most the configured
        budget), if that is at least FOLD_MIN_TOKENS; otherwise the configured budget, in a forward of its own.
        A burst of 16 prompts then gets its first tokens a few at a time, each step one forward: `serve_load.py`,
        16 clients x 2 requests, bfloat16 at TP=2, TTFT p50 233-266 ms with the whole budget of 128 against 71-75
        ms with 48 (the same tokens/s)."""
        room = self.engine.fold_rows - decoding
        return min(self.max_num_batched_tokens, room) if room >= FOLD_MIN_TOKENS else self.max_num_batched_tokens

    def _sooner(self, seq: Sequence, reuse: int, chunks: list[tuple[Sequence, int]]) -> bool:
        """Whether a prompt this step prefills shares PREFIX_MIN_TOKENS more of ``seq``'s prefix than ``reuse``."""
        if not self.prefix_caching or seq.prompt_logprobs:
            return False
        limit = len(seq.prompt_ids) - 1
        return any(_common_prefix(other.prompt_ids, seq.prompt_ids, min(limit, other.computed + n))
                   >= reuse + PREFIX_MIN_TOKENS for other, n in chunks)

    def _take_free_slot(self) -> int:
        """The lowest free slot that caches nothing, else the one freed longest ago (its cached prefix is lost)."""
        empty = [slot for slot in self._free if slot not in self._cached]
        slot = min(empty) if empty else next(slot for slot in self._cached if slot in self._free)
        self._free.remove(slot)
        return slot

    def _match(self, seq: Sequence) -> tuple[int, int | None]:
        """The longest prefix of ``seq``'s prompt (all but its last token, whose logits the step needs) whose keys and
        values a slot holds: (length, slot). A free slot's is taken over as it is; a running sequence's is copied,
        and only from PREFIX_MIN_TOKENS on."""
        prompt, limit = seq.prompt_ids, len(seq.prompt_ids) - 1
        best, source = 0, None
        for slot, tokens in self._cached.items():
            n = _common_prefix(tokens, prompt, limit)
            if n > best:
                best, source = n, slot
        for other in self._running:
            reach = min(limit, other.computed)
            n = _common_prefix(other.prompt_ids, prompt, reach)
            if n == len(other.prompt_ids) < reach:  # all of its prompt: on into what it generated
                n += _common_prefix(other.token_ids, prompt[n:], reach - n)
            if n > best and n >= PREFIX_MIN_TOKENS:
                best, source = n, other.slot
        return best, source

    def _retire(self) -> None:
        """Give back the slots of finished and cancelled sequences (not while a micro-batch still carries them)."""
        if not any((seq.finish_reason or seq.cancelled) and not seq.in_flight for seq in self._running):
            return
        with self._cond:
            keep = []
            for seq in self._running:
                if (seq.finish_reason or seq.cancelled) and not seq.in_flight:
                    self._free.append(seq.slot)
                    if self.prefix_caching and seq.computed:
                        self._cached.pop(seq.slot, None)  # re-inserted: the most recently freed
                        self._cached[seq.slot] = (seq.prompt_ids + seq.token_ids)[: seq.computed]
                else:
                    keep.append(seq)
            self._free.sort(reverse=True)
            self._running = keep

    @staticmethod
    def _echo(prefilled: list[Sequence], echo_logits: dict[int, torch.Tensor]) -> None:
        """Hand echoing sequences their prompt: each token's logprob given the tokens before it (None for the first)
        and, when asked, its likeliest alternatives there, from every position's logits; echo only: finish."""
        for seq in prefilled:
            if not seq.echo or seq.token_ids or seq.cancelled:  # a recompute prefill (Phi-3) echoes nothing again
                continue
            logprobs: list[float | None] | None = None
            tops: list[list[tuple[int, float]] | None] | None = None
            if seq.prompt_logprobs:
                full = echo_logits[seq.slot][: len(seq.prompt_ids) - 1].log_softmax(-1)
                chosen = full.gather(1, torch.tensor(seq.prompt_ids[1:], device=full.device)[:, None])[:, 0]
                logprobs = [None, *chosen.tolist()]
                tops = [None] * len(seq.prompt_ids)
                if seq.top_logprobs > 0:
                    values, ids = full.topk(seq.top_logprobs, dim=-1)
                    tops[1:] = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
            seq.output.prompt(seq.prompt_ids, logprobs, tops)
            if not seq.generate:
                seq.finish_reason = "length"
                seq.output.finish("length")

    def _advance(self, sequences: list[Sequence], logits: torch.Tensor, candidates: int = 0) -> None:
        """Sample one token per row of (B, V) ``logits`` with each sequence's parameters, then check its stops. With
        ``candidates`` k, rows are (B, 2k + 1) candidates (``_candidates``) of greedy sequences instead."""
        if candidates:
            k = candidates
            values, ids, lse = logits[:, :k], logits[:, k : 2 * k].long(), logits[:, 2 * k]
            tokens = ids[:, 0].tolist()
            logprobs_k = values - lse[:, None]
        else:
            tokens = self._sample(sequences, logits)
        for row, (seq, token) in enumerate(zip(sequences, tokens, strict=True)):
            if seq.cancelled or seq.finish_reason:  # left, or echo only (finished at its prefill)
                continue
            logprob, top = None, None
            if candidates and seq.top_logprobs is not None:
                logprob = float(logprobs_k[row, 0])
                n = seq.top_logprobs
                top = list(zip(ids[row, :n].tolist(), logprobs_k[row, :n].tolist(), strict=True)) if n > 0 else None
            elif seq.top_logprobs is not None:
                logprobs = logits[row].log_softmax(-1)
                logprob = float(logprobs[token])
                if seq.top_logprobs > 0:
                    values, ids = logprobs.topk(seq.top_logprobs)
                    top = list(zip(ids.tolist(), values.tolist(), strict=True))
            seq.token_ids.append(token)
            self.generated_tokens += 1
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


MAX_CANDIDATES = 20  # OpenAI's largest top_logprobs


def _nothing() -> None:
    """``Scheduler.after_send`` where no server listens (nothing waits to be handed over)."""


def _candidates_for(decoding: list[Sequence]) -> int:
    """k for a step whose decodes are all greedy (each needing at most k logprobs): 0 when any row samples."""
    if not decoding or not all(seq.params.greedy for seq in decoding):
        return 0
    k = max(1, *(seq.top_logprobs or 0 for seq in decoding))
    return k if k <= MAX_CANDIDATES else 0


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens a and b share, at most ``limit`` (binary search over slice comparisons)."""
    n = min(len(a), len(b), limit)
    if n <= 0 or a[:n] == b[:n]:
        return max(n, 0)
    low, high = 0, n  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid
    return low


class Router:
    """Rank 0 with data-parallel replicas: one scheduler per replica behind the server's single endpoint. A request's
    sequences all go to the least-loaded replica (running + waiting; the lowest-numbered among equals)."""

    def __init__(self, schedulers: list[Scheduler]) -> None:
        self.schedulers = schedulers
        self.max_seq_len = schedulers[0].max_seq_len
        self.max_waiting = sum(s.max_waiting for s in schedulers)
        self._lock = threading.Lock()

    @property
    def num_waiting(self) -> int:
        return sum(s.num_waiting for s in self.schedulers)

    @property
    def num_running(self) -> int:
        return sum(s.num_running for s in self.schedulers)

    def load(self, replica: int) -> int:
        s = self.schedulers[replica]
        return s.num_running + s.num_waiting

    def add(self, sequences: list[Sequence]) -> bool:
        """Queue on the least-loaded replica that has room; False when none has."""
        with self._lock:  # two requests arriving together do not both pick the same "least loaded" replica blindly
            for replica in sorted(range(len(self.schedulers)), key=self.load):
                if self.schedulers[replica].add(sequences):
                    return True
        return False
