"""Every message rank 0 sends the other ranks, one dataclass per cross-rank operation.

Rank 0 owns the tokenizer and all I/O; the workers only ever receive one of these, broadcast as JSON on the control
group (``Communicator.broadcast_json``: JSON, never pickle, since a message carries request data), and run the
same operation. Only token ids, positions, slots and sampling parameters cross ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

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
    """One continuous-batching step: prompts of newly admitted sequences (each from position 0) and the last token
    of every running one."""

    prefill: list[tuple[int, list[int]]] = field(default_factory=list)  # (slot, prompt token ids)
    decode: list[tuple[int, int, int]] = field(default_factory=list)  # (slot, token id, position)
    op: ClassVar[str] = "step"

    def fields(self) -> dict[str, Any]:
        return {"prefill": [list(p) for p in self.prefill], "decode": [list(d) for d in self.decode]}

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Step:
        return cls([(int(s), list(t)) for s, t in raw["prefill"]], [(int(s), int(t), int(p)) for s, t, p in raw["decode"]])


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


Message = Generate | Step | Score | Bench | Stop
KINDS: dict[str, type] = {kind.op: kind for kind in (Generate, Step, Score, Bench, Stop)}


def encode(message: Message) -> dict[str, Any]:
    return {"op": message.op, **message.fields()}


def decode(raw: dict[str, Any]) -> Message:
    kind = KINDS.get(raw.get("op"))
    if kind is None:
        raise RuntimeError(f"unknown message {raw.get('op')!r}")
    return kind.parse(raw)


def send(comm, message: Message) -> Message:  # noqa: ANN001
    """Rank 0: broadcast ``message`` to every rank (returns it, for symmetry with ``receive``)."""
    comm.broadcast_json(encode(message))
    return message


def receive(comm) -> Message:  # noqa: ANN001
    """A worker: the next message from rank 0."""
    return decode(comm.broadcast_json(None))


__all__ = ["Bench", "Generate", "Message", "Score", "Step", "Stop", "decode", "encode", "receive", "send"]
