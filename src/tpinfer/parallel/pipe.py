"""Point-to-point traffic of a pipeline: activations from stage to stage, and results back to rank 0.

Each TP rank of a stage sends its (replicated) hidden states to the same TP rank of the next stage, so every rank of
a stage starts from the same input without a collective inside the stage. The last stage's TP rank 0 (the
"sampler") holds the full logits after the head's gather; it sends them, or the sampled tokens, to rank 0.

All traffic runs on the replica's data group (gloo for CPU tensors, NCCL for CUDA ones), whose timeout is the
collective timeout: a dead stage fails the others' receive instead of hanging them. Sends and bytes are counted in
``stats`` under ``pipe_send``/``pipe_recv``, seconds spent waiting to receive under ``pipe_wait``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from tpinfer.parallel.comm import CommStats
from tpinfer.parallel.mesh import Mesh

MAX_PENDING = 64  # sends in flight before the oldest is waited for (a few per micro-batch are in flight at a time)


class Pipe:
    def __init__(self, mesh: Mesh, rank: int, group: Any, relay_group: Any, device: torch.device,
                 replica: int | None = None) -> None:
        """The pipe of this rank's replica, or (rank 0, ``replica`` another one) the way to that replica's results."""
        self.mesh, self.rank, self.group, self.device = mesh, rank, group, device
        self.relay_group = relay_group
        stage, own, tp_rank = mesh.coords(rank)
        member = replica is None or replica == own
        replica = own if replica is None else replica
        self.stage = stage
        self.prev = mesh.rank(stage - 1, replica, tp_rank) if member and stage > 0 else None
        self.next = mesh.rank(stage + 1, replica, tp_rank) if member and stage < mesh.pp - 1 else None
        self.sampler = mesh.rank(mesh.pp - 1, replica, 0)  # last stage, TP rank 0: the replica's full logits
        self.stats = CommStats()
        self._pending: list[Any] = []

    def _count(self, kind: str, tensor: torch.Tensor, seconds: float = 0.0) -> None:
        self.stats.record(kind, tensor.numel() * tensor.element_size(), seconds)

    def send_next(self, hidden: torch.Tensor) -> None:
        """Hand this stage's output to the next stage, without waiting for it to be received."""
        hidden = hidden.contiguous()
        self._count("pipe_send", hidden)
        self._isend(hidden, self.next, self.group)

    def relay(self, message: bytes) -> None:
        """Pass a control message on to the next stage (length first, then the bytes), without waiting."""
        body = torch.frombuffer(bytearray(message), dtype=torch.uint8) if message else torch.empty(0, dtype=torch.uint8)
        self._isend(torch.tensor([len(message)], dtype=torch.int64), self.next, self.relay_group)
        if message:
            self._isend(body, self.next, self.relay_group)

    def receive_relayed(self) -> bytes:
        """The next control message from the previous stage (waits as long as it takes: the relay group's wait has
        no practical timeout; a dead peer fails it at once)."""
        length = torch.empty(1, dtype=torch.int64)
        dist.recv(length, self.prev, group=self.relay_group)
        body = torch.empty(int(length), dtype=torch.uint8)
        if int(length):
            dist.recv(body, self.prev, group=self.relay_group)
        return body.numpy().tobytes()

    def _isend(self, tensor: torch.Tensor, dst: int, group: Any) -> None:
        """A send the caller does not wait for; its buffer lives in ``_pending`` until it completes. Rendezvous
        transports (gloo) complete a send only once the receiver posts its receive, so no stage ever waits here for
        a later one: that would stall the pipeline (rank 0 would wait for the last stage before starting the next
        micro-batch)."""
        self._pending = [(work, t) for work, t in self._pending if not work.is_completed()]
        if len(self._pending) >= MAX_PENDING:
            self._pending.pop(0)[0].wait()
        self._pending.append((dist.isend(tensor, dst, group=group), tensor))

    def recv_prev(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The previous stage's output for this step."""
        out = torch.empty(shape, dtype=dtype, device=self.device)
        start = time.perf_counter()
        dist.recv(out, self.prev, group=self.group)
        self._count("pipe_recv", out, 0.0)
        self.stats.record("pipe_wait", 0, time.perf_counter() - start, calls=1)
        return out

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """A result to global rank ``dst`` (the sampler's logits to rank 0), without waiting for it to be received."""
        tensor = tensor.contiguous()
        self._count("pipe_send", tensor)
        self._isend(tensor, dst, self.group)

    def recv(self, out: torch.Tensor, src: int) -> torch.Tensor:
        start = time.perf_counter()
        dist.recv(out, src, group=self.group)
        self._count("pipe_recv", out)
        self.stats.record("pipe_wait", 0, time.perf_counter() - start, calls=1)
        return out

    def broadcast_from_sampler(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sampler's ``tensor`` (the chosen tokens) on every rank of the replica, in place."""
        start = time.perf_counter()
        dist.broadcast(tensor, self.sampler, group=self.group)
        self.stats.record("pipe_broadcast", tensor.numel() * tensor.element_size(), time.perf_counter() - start)
        return tensor

    def to_first(self, tensor: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The sampler's ``tensor`` (full logits) on rank 0, which schedules; None on every other rank."""
        if self.sampler == 0:
            return tensor if self.rank == 0 else None
        if self.rank == self.sampler:
            self.send(tensor, 0)
            return None
        if self.rank == 0:
            return self.recv(torch.empty(shape, dtype=torch.float32, device=self.device), self.sampler)
        return None

    def flush(self) -> None:
        """Wait for this rank's sends in flight (their buffers must live until then)."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
