"""The few collectives tpinfer uses, each a no-op at world size 1, with accounting.

Backends: NCCL for CUDA tensors, gloo for CPU tensors, and a shared-memory all-reduce for CPU ranks
on one host (``tpinfer.parallel.shm``). Every call is counted by kind (calls and bytes) in
``CommStats`` so tests and the benchmark can read what a forward step cost.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from tpinfer.parallel.shm import SegmentUnavailable

log = logging.getLogger(__name__)

# One broadcast carries a control message up to this size, a second the rest. 16 KiB holds an embedding batch of
# 32 x 64 token ids (10.9 KB as messages.Embed sends them; 13.7 KB as JSON lists): 0.71 against 0.89 ms at 4 KiB on
# gloo's loopback, a short message the same.
CONTROL_BYTES = 16384
SMALL_GATHER_BYTES = 64 << 10  # all-gathers up to this size go through the shared-memory all-reduce


@dataclass
class CommStats:
    """Collectives issued by this rank: calls, bytes and seconds by kind."""

    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    timed: bool = False

    def record(self, kind: str, nbytes: int, seconds: float = 0.0, calls: int = 1) -> None:
        self.calls[kind] += calls
        self.bytes[kind] += nbytes
        self.seconds[kind] += seconds

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()
        self.seconds.clear()

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {k: {"calls": self.calls[k], "bytes": self.bytes[k], "seconds": self.seconds[k]} for k in self.calls}


def _pad_sequence(x: torch.Tensor, world: int) -> torch.Tensor:
    """(B, T, ...) zero-padded along T to a multiple of ``world``."""
    pad = -x.shape[1] % world
    if not pad:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], pad, *x.shape[2:]))], dim=1)


class Communicator:
    """Collectives over one process group; ``world_size == 1`` makes every call free."""

    def __init__(
        self,
        group: Any,
        rank: int,
        world_size: int,
        device: torch.device,
        all_reduce_impl: Any = None,
        control_group: Any = None,
    ) -> None:
        self.group = group
        self.device = device
        # Control messages (requests, steps, stop) ride a CPU gloo group of their own; see broadcast_json.
        self.control_group = control_group
        self._control_buffer = torch.zeros(CONTROL_BYTES, dtype=torch.uint8)
        self.rank = rank
        self.world_size = world_size
        self.stats = CommStats()
        # An object with all_reduce_(tensor) (the shared-memory all-reduce) or None for the process group's.
        self.all_reduce_impl = all_reduce_impl
        # Sequence parallelism: the full sequence length of the forward running sequence-parallel, else None.
        self.sequence_len: int | None = None
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None  # (local input, its gathered sequence)
        self._no_shared_rows = False  # the shared-memory group could not map the buffers of sums split by rows

    def _timed(self, kind: str, nbytes: int, fn: Any, *args: Any) -> Any:
        if not self.stats.timed:
            self.stats.record(kind, nbytes)
            return fn(*args)
        start = time.perf_counter()
        out = fn(*args)
        self.stats.record(kind, nbytes, time.perf_counter() - start)
        return out

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks."""
        if self.world_size == 1:
            return tensor
        nbytes = tensor.numel() * tensor.element_size()
        if self.all_reduce_impl is not None and tensor.device.type == "cpu":
            return self._timed("all_reduce", nbytes, self.all_reduce_impl.all_reduce_, tensor)
        self._timed("all_reduce", nbytes, dist.all_reduce, tensor, dist.ReduceOp.SUM, self.group)
        return tensor

    def all_reduce_parts(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """Every rank's ``tensor`` in rank order, for a caller that sums them itself (fusing the sum with what follows
        it; in rank order, so every rank gets the same bits): ``(tensor,)`` for one rank, views of the shared-memory
        segment valid until this rank's next collective, or None where the sum must go through ``all_reduce`` (gloo
        or NCCL, or a tensor larger than the segment's slots)."""
        if self.world_size == 1:
            return (tensor,)
        impl = self.all_reduce_impl
        if (impl is None or not hasattr(impl, "exchange") or tensor.device.type != "cpu"
                or tensor.nbytes > impl.max_bytes):
            return None
        return self._timed("all_reduce", tensor.numel() * tensor.element_size(), impl.exchange, tensor)

    # Sums split by rows through shared memory (the native encoder; tpinfer.parallel.shm): each rank finishes its
    # own rows of a sum into a buffer every rank maps, then a barrier, and every rank reads the whole.

    def shared_rows(self, nbytes: int) -> tuple[tuple[torch.Tensor, torch.Tensor], Callable[[int], tuple[int, int]]] | None:
        """For a sum of ``nbytes`` split by rows: the two shared buffers (uint8, every rank maps them) and a function
        of the row count giving this rank's ``[start, stop)``; None where the sums cannot go this way (one rank, no
        shared-memory group, or more than its slots hold)."""
        impl = self.all_reduce_impl
        if (self.world_size == 1 or impl is None or not hasattr(impl, "exchange_rows") or nbytes > impl.max_bytes
                or self._no_shared_rows):
            return None
        try:
            buffers = impl.shared_buffers()
        except SegmentUnavailable as e:  # every rank gets it, so every rank falls back alike
            log.warning("sums not split by rows (they all-reduce instead): %s", e)
            self._no_shared_rows = True
            return None
        return buffers, impl.own_rows

    def exchange_rows(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every rank's rows ``own_rows`` of its ``tensor``, in rank order (after ``shared_rows`` said yes)."""
        parts = self._timed("reduce_scatter", tensor.numel() * tensor.element_size(),
                            self.all_reduce_impl.exchange_rows, tensor)
        if parts is None:
            raise ValueError(f"{tuple(tensor.shape)} {tensor.dtype} cannot be exchanged by rows through shared memory")
        return parts

    def rows_barrier(self) -> None:
        """Every rank has written its rows of a shared buffer (the gather half of a sum split by rows)."""
        self._timed("all_gather", 0, self.all_reduce_impl.barrier)

    # Sequence parallelism (Megatron's SP): in a forward where ``sequence_len`` is set, the residual stream between
    # layers holds this rank's 1/tp of the (padded) sequence, (B, T_local, H). A row-parallel output's partial sums
    # are reduce-scattered along the sequence instead of all-reduced, and a column-parallel input is all-gathered
    # first: the same bytes as the all-reduce (reduce-scatter + all-gather = all-reduce), activations 1/tp.

    def sum_partials(self, partial: torch.Tensor) -> torch.Tensor:
        """Every rank's partial (B, T, H) summed: whole (all-reduce), or under sequence parallelism this rank's
        sequence chunk (B, T_local, H) of the sum."""
        if self.world_size == 1:
            return partial
        if self.sequence_len is None:
            return self.all_reduce(partial)
        partial = _pad_sequence(partial, self.world_size)
        if partial.device.type == "cuda":  # NCCL reduce-scatters; the chunks are the sequence's, so move it first
            chunks = partial.movedim(1, 0).contiguous()
            out = torch.empty_like(chunks.chunk(self.world_size)[0])
            nbytes = partial.numel() * partial.element_size()
            self._timed("reduce_scatter", nbytes, dist.reduce_scatter_tensor, out, chunks, dist.ReduceOp.SUM,
                        self.group)
            return out.movedim(0, 1).contiguous()
        # gloo has no reduce-scatter: the all-reduce (shared memory or gloo), then this rank's chunk
        self.all_reduce(partial)
        return partial.chunk(self.world_size, dim=1)[self.rank].contiguous()

    def gather_sequence(self, local: torch.Tensor) -> torch.Tensor:
        """Under sequence parallelism, the whole sequence (B, T, H) from every rank's chunk; else ``local``. The
        last gather is kept, so q, k and v (or gate and up) reading the same input gather it once."""
        if self.world_size == 1 or self.sequence_len is None:
            return local
        if self._gathered is not None and self._gathered[0] is local:
            return self._gathered[1]
        full = self.all_gather(local, dim=1)[:, : self.sequence_len]
        self._gathered = (local, full)
        return full

    def scatter_sequence(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's chunk of a (B, T, H) tensor every rank holds whole (no communication)."""
        if self.world_size == 1 or self.sequence_len is None:
            return full
        return _pad_sequence(full, self.world_size).chunk(self.world_size, dim=1)[self.rank].contiguous()

    def end_sequence_parallel(self) -> None:
        self.sequence_len, self._gathered = None, None

    # Native decode (tpinfer.kernels.DecodeStack) all-reduces through the shared-memory segment itself.

    def native_group(self, nbytes: int) -> tuple[bool, Any]:
        """(usable, group) for native code all-reducing messages of ``nbytes``: group is None for one rank, the
        shared-memory group's ShmGroup otherwise; usable is False when the sums must go through this class
        (gloo or NCCL, or messages larger than the segment's slots)."""
        if self.world_size == 1:
            return True, None
        impl = self.all_reduce_impl
        if impl is None or not hasattr(impl, "native_group") or nbytes > impl.max_bytes:
            return False, None
        return True, impl.native_group()

    def finish_native(self, tensor: torch.Tensor) -> None:
        """Complete the all-reduce round native code left open on ``tensor`` (a late peer)."""
        start = time.perf_counter()
        self.all_reduce_impl.finish_published(tensor)
        if self.stats.timed:
            self.stats.record("all_reduce", 0, time.perf_counter() - start, calls=0)

    def native_done(self) -> None:
        """After native code all-reduced: take the round counter back and count its collectives."""
        if self.world_size > 1:
            calls, nbytes, seconds = self.all_reduce_impl.take_back()
            if calls:
                self.stats.record("all_reduce", nbytes, seconds if self.stats.timed else 0.0, calls=calls)

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along ``dim`` in rank order."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self.all_reduce_impl is not None and tensor.device.type == "cpu" and nbytes <= SMALL_GATHER_BYTES:
            # Small messages (sampling candidates): an all-reduce of zero-padded slots through shared memory is
            # an exact all-gather (x + 0 == x) at a fraction of gloo's latency.
            slots = torch.zeros((self.world_size, *tensor.shape), dtype=tensor.dtype)
            slots[self.rank] = tensor
            self._timed("all_gather", nbytes, self.all_reduce_impl.all_reduce_, slots)
            return torch.cat(slots.unbind(0), dim=dim)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._timed("all_gather", nbytes, dist.all_gather, parts, tensor, self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        nbytes = tensor.numel() * tensor.element_size()
        self._timed("broadcast", nbytes, dist.broadcast, tensor, self._global_rank(src), self.group)
        return tensor

    def broadcast_json(self, message: Any, src: int = 0) -> Any:
        """Send a JSON-able control message from ``src`` to every rank.

        JSON rather than pickle: a message may carry data from a request, and nothing from a request
        is ever unpickled. It travels on the control group, whose wait has no practical timeout (a worker
        may idle between requests for as long as the user likes; a dead peer still fails it at once), in
        one fixed-size broadcast (length + the first bytes), plus a second only for long messages.
        """
        if self.world_size == 1:
            return message
        head = self._control_buffer
        if self.rank == src:
            data = json.dumps(message).encode()
            head[:8] = torch.frombuffer(bytearray(len(data).to_bytes(8, "little")), dtype=torch.uint8)
            first = data[: CONTROL_BYTES - 8]
            if first:
                head[8 : 8 + len(first)] = torch.frombuffer(bytearray(first), dtype=torch.uint8)
        self._control_broadcast(head, src)
        length = int.from_bytes(head[:8].numpy().tobytes(), "little")
        rest = None
        if length > CONTROL_BYTES - 8:
            if self.rank == src:
                rest = torch.frombuffer(bytearray(data[CONTROL_BYTES - 8 :]), dtype=torch.uint8)
            else:
                rest = torch.empty(length - (CONTROL_BYTES - 8), dtype=torch.uint8)
            self._control_broadcast(rest, src)
        if self.rank == src:
            return message
        body = head[8 : 8 + min(length, CONTROL_BYTES - 8)].numpy().tobytes()
        if rest is not None:
            body += rest.numpy().tobytes()
        return json.loads(body.decode())

    def _control_broadcast(self, tensor: torch.Tensor, src: int) -> None:
        group = self.control_group if self.control_group is not None else self.group
        self._timed("control", tensor.numel(), dist.broadcast, tensor, src, group)

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._timed("all_gather_object", 0, dist.all_gather_object, out, obj, self.group)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def _global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def close(self) -> None:
        if self.all_reduce_impl is not None:
            self.all_reduce_impl.close()
            self.all_reduce_impl = None
