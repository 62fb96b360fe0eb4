"""Every message rank 0 sends the other ranks, one dataclass per cross-rank operation.

Rank 0 owns the tokenizer and all I/O; the workers only ever receive one of these, broadcast as JSON on the control
group (``Communicator.broadcast_json``: JSON, never pickle, since a message carries request data), and run the
same operation. Only token ids, positions, slots and sampling parameters cross ranks.
"""

from __future__ import annotations

import base64
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from tpinfer.engine.sampling import SamplingParams


@dataclass
class Generate:
    """Offline generation of whole prompts (``Generator.generate`` on every rank)."""

    prompts: list[list[int]]
    params: SamplingParams
    op: ClassVar[str] = "generate"

    def fields(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "params": self.params.to_dict()}

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Generate:
        return cls(raw["prompts"], SamplingParams.from_dict(raw["params"]))


@dataclass
class Step:
    """One continuous-batching step: new tokens of sequences being prefilled (a whole prompt, or a chunk of one
    from ``starts``), and the last token of every running one. ``copies`` run first: (source slot, target slot,
    length), a cached prefix one sequence shares with another (prefix caching)."""

    prefill: list[tuple[int, list[int]]] = field(default_factory=list)  # (slot, token ids)
    decode: list[tuple[int, int, int]] = field(default_factory=list)  # (slot, token id, position)
    echo: list[int] = field(default_factory=list)  # prefill slots whose every position's logits rank 0 needs
    starts: list[int] = field(default_factory=list)  # per prefill entry, its first position (empty: all 0)
    copies: list[tuple[int, int, int]] = field(default_factory=list)
    # k > 0: the decodes need only each row's k likeliest tokens (greedy rows, up to k logprobs): every rank sends its
    # top k and log-sum-exp instead of its vocabulary shard (``sampling.local_candidates``).
    candidates: int = 0
    # With candidates: whether any decode row wants logprobs (else no rank computes its log-sum-exp).
    logprobs: bool = True
    op: ClassVar[str] = "step"

    def fields(self) -> dict[str, Any]:
        return {"prefill": [list(p) for p in self.prefill], "decode": [list(d) for d in self.decode],
                "echo": list(self.echo), "starts": list(self.starts), "copies": [list(c) for c in self.copies],
                "candidates": self.candidates, "logprobs": self.logprobs}

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Step:
        return cls([(int(s), list(t)) for s, t in raw["prefill"]], [(int(s), int(t), int(p)) for s, t, p in raw["decode"]],
                   [int(s) for s in raw.get("echo", ())], [int(s) for s in raw.get("starts", ())],
                   [(int(a), int(b), int(n)) for a, b, n in raw.get("copies", ())], int(raw.get("candidates", 0)),
                   bool(raw.get("logprobs", True)))

    def start(self, entry: int) -> int:
        return self.starts[entry] if self.starts else 0


@dataclass
class Score:
    """Teacher-forced logits of whole sequences (``tpinfer verify``): every position's distribution."""

    sequences: list[list[int]]
    op: ClassVar[str] = "score"

    def fields(self) -> dict[str, Any]:
        return {"sequences": self.sequences}

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Score:
        return cls(raw["sequences"])


@dataclass
class Embed:
    """An encoder's forward of whole token sequences, pooled into sentence embeddings (``Encoder.embed``).

    The sequences travel as one run of int32 ids (base64) and their lengths, not as JSON lists: for 32 x 64 ids
    0.1 ms on rank 0 and on a worker, against 0.45 ms each to write, read and tensorize the lists."""

    ids: torch.Tensor  # every sequence's token ids one after another, int64
    lengths: list[int]
    op: ClassVar[str] = "embed"

    @classmethod
    def of(cls, sequences: list[list[int]]) -> Embed:
        lengths = [len(s) for s in sequences]
        flat = np.fromiter(itertools.chain.from_iterable(sequences), np.int64, count=sum(lengths))
        return cls(torch.from_numpy(flat), lengths)

    def fields(self) -> dict[str, Any]:
        data = self.ids.to(torch.int32).numpy().astype("<i4", copy=False).tobytes()
        return {"lengths": self.lengths, "ids": base64.b64encode(data).decode("ascii")}

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Embed:
        data = base64.b64decode(raw["ids"])
        ids = torch.from_numpy(np.frombuffer(data, dtype="<i4").astype(np.int64))
        lengths = [int(n) for n in raw["lengths"]]
        if sum(lengths) != ids.numel() or min(lengths, default=1) < 1:
            raise RuntimeError(f"embed message with {ids.numel()} ids for sequences of lengths {lengths}")
        return cls(ids, lengths)


@dataclass
class Bench:
    """A measurement every rank takes part in (``tpinfer.engine.bench``); each rank's result is gathered."""

    kind: str
    args: dict[str, Any] = field(default_factory=dict)
    op: ClassVar[str] = "bench"

    def fields(self) -> dict[str, Any]:
        return {"kind": self.kind, "args": self.args}

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Bench:
        return cls(raw["kind"], raw.get("args") or {})


@dataclass
class Stop:
    """Leave the worker loop."""

    op: ClassVar[str] = "stop"

    def fields(self) -> dict[str, Any]:
        return {}

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Stop:
        return cls()


Message = Generate | Step | Score | Embed | Bench | Stop
KINDS: dict[str, type] = {kind.op: kind for kind in (Generate, Step, Score, Embed, Bench, Stop)}


def encode(message: Message) -> dict[str, Any]:
    return {"op": message.op, **message.fields()}


def decode(raw: dict[str, Any]) -> Message:
    kind = KINDS.get(raw.get("op"))
    if kind is None:
        raise RuntimeError(f"unknown message {raw.get('op')!r}")
    return kind.parse(raw)


def send(ctx, message: Message, replica: int = 0) -> Message:  # noqa: ANN001
    """Rank 0: ``message`` to every rank of data-parallel ``replica`` (returns it, for symmetry with ``receive``).

    A broadcast reaches the replica's first pipeline stage; each stage then relays it to the next
    (``Pipe.relay``), so a later stage receives a step's message just before its activations, and rank 0 never
    waits for a later stage to finish before it can send the next micro-batch."""
    raw = encode(message)
    control = ctx.controls[replica] if ctx.controls else ctx.control
    control.broadcast_json(raw)
    if replica == ctx.dp_rank:
        _relay(ctx, raw)
    return message


def receive(ctx) -> Message:  # noqa: ANN001
    """A worker: the next message from rank 0 (on the first stage) or from the stage before (on later stages)."""
    if ctx.control is not None:
        raw = ctx.control.broadcast_json(None)
    else:
        raw = json.loads(ctx.pipe.receive_relayed().decode())
    _relay(ctx, raw)
    return decode(raw)


def _relay(ctx, raw: dict[str, Any]) -> None:  # noqa: ANN001
    if ctx.pipe is not None and not ctx.is_last_stage:
        ctx.pipe.relay(json.dumps(raw).encode())


__all__ = ["Bench", "Embed", "Generate", "Message", "Score", "Step", "Stop", "decode", "encode", "receive", "send"]
