"""All-reduce through shared memory, for the ranks of one host.

During decode every layer all-reduces a tiny (batch x hidden) tensor twice. Over gloo's loopback
sockets that costs ~100+ us a call and dominates the step; here the ranks exchange their partial
sums through one shared-memory segment instead and each call costs a few torch ops.

Segment layout (one per group, created by rank 0, mapped by every rank):

    header:  W int64 sequence counters, one per 64-byte cache line (no false sharing)
    data:    2 slots x W ranks x slot_bytes     (double-buffered, see ``_exchange``)

One round, on every rank: copy the own contribution into data[k % 2][rank], publish
``seq[rank] = k``, wait until every ``seq[r] >= k``, then sum data[k % 2][0..W-1] in rank order
into the caller's tensor. Every rank performs the same ops on the same bytes in the same order,
so the result is bitwise identical on all ranks. bf16/fp16 are accumulated in float32 and rounded
once. Messages larger than ``max_bytes`` run as several rounds.

Sums split by rows (``exchange_rows``, ``barrier``, ``shared_buffers``): a rank publishes only the rows the other
ranks own and sums its own share; the results go into a second segment every rank maps (two buffers of
``max_bytes``, created the first time they are asked for), where after a barrier round every rank reads the whole.
The rounds order it as they order the slots: a rank writes its rows of a buffer only after an exchange round that
every rank entered after its last read of that buffer.

Memory ordering: this relies on x86-64 TSO, where stores become visible in program order and
loads are not reordered with older loads, so "write data, then store the counter" on one side and
"load the counter, then read data" on the other need no fence. The counter is stored and loaded
through a ``memoryview`` cast to int64, which CPython does as one aligned 8-byte memcpy, i.e. one
atomic mov. (When torch copies a large chunk with several threads, their stores happen before the
copy returns, and x86 store order is transitive, so the same holds.) On a weakly ordered CPU (ARM,
POWER) a release fence (``dmb ish``) would be needed before the counter store and an acquire fence
after the counter load; pure Python cannot emit those, so the constructor refuses other
architectures (see ``is_supported``).

Lifetime: rank 0 unlinks the segment as soon as every rank has mapped it, so from then on the
name is gone from /dev/shm and the memory is freed by the kernel when the last rank unmaps it or
dies, even by SIGKILL. Before that point, a crash of rank 0 is covered by multiprocessing's
resource tracker (rank 0 creates through ``SharedMemory``); the other ranks map the file directly
and never register it, which sidesteps the Python < 3.13 quirk where every attaching process's
tracker would unlink the segment (and warn about a "leak") when that process exits.
"""

from __future__ import annotations

import logging
import mmap
import os
import platform
import re
import secrets
import socket
import sys
import time
import weakref
from datetime import timedelta
from multiprocessing import shared_memory
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_CACHE_LINE = 64
_PAGE = 4096
_COUNTER_STRIDE = _CACHE_LINE // 8  # int64 slots between two ranks' counters
_ACCUMULATE = {
    torch.float32: None,
    torch.float64: None,
    torch.bfloat16: torch.float32,
    torch.float16: torch.float32,
}
_MAX_PLANS = 64

# Waiting: poll the counter briefly, then sched_yield, then sleep with exponential backoff. Polling
# longer does not pay: whenever the machine has more runnable processes than cores (more ranks than
# cores, or anything else running) a polling rank holds the core the late rank needs, while
# sched_yield returns in ~1 us when nothing else wants the core, so it costs little when idle.
_SPINS = 50  # ~10 us of polling, when every rank has a core of its own
_OVERSUBSCRIBED_SPINS = 5  # more ranks than cores
_YIELD_S = 2e-3  # yield the core until this long has passed, then sleep
_FIRST_SLEEP_S = 50e-6
_MAX_SLEEP_S = 1e-3
_NATIVE_SPIN_S = 20e-6  # native code polls this long (when every rank has a core), then yields like _wait


class CollectiveTimeout(RuntimeError):
    """Some ranks did not arrive at a shared-memory collective within its timeout."""


class SegmentUnavailable(RuntimeError):
    """Rank 0 could not create a shared-memory segment (/dev/shm full or not writable); every rank raises it."""


_FAILED = "!failed: "  # what rank 0 publishes instead of a segment's name when it cannot create it


def is_supported() -> bool:
    """True on Linux x86-64 with /dev/shm: the ordering argument in the module docstring holds."""
    return sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64") and os.path.isdir(SHM_DIR)


def host_identity() -> str:
    """Hostname, kernel boot id and /dev/shm's device: equal exactly when two processes share /dev/shm."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = "?"
    shm_dev = os.stat(SHM_DIR).st_dev if os.path.isdir(SHM_DIR) else -1
    return f"{socket.gethostname()}|{boot_id}|{shm_dev}"


def all_ranks_on_one_host(
    rank: int, world_size: int, store: dist.Store, *, prefix: str = "tpinfer-host", timeout_s: float = 60.0
) -> bool:
    """Collective: True if every rank runs on this host and sees the same /dev/shm.

    Use a prefix not used before on ``store``.
    """
    store.set(f"{prefix}/{rank}", host_identity())
    keys = {r: f"{prefix}/{r}" for r in range(world_size)}
    _wait_keys(store, keys, timeout_s, rank, "report its host")
    return len({store.get(key) for key in keys.values()}) == 1


def _wait_keys(store: dist.Store, keys: dict[int, str], timeout_s: float, rank: int, what: str) -> None:
    """store.wait on one key per rank; a timeout names the ranks whose key is missing."""
    try:
        store.wait(list(keys.values()), timedelta(seconds=timeout_s))
    except RuntimeError as e:  # DistStoreError on timeout
        late = [str(r) for r, key in keys.items() if not store.check([key])]
        raise CollectiveTimeout(
            f"rank {rank}: timed out after {timeout_s} s waiting for rank(s) {', '.join(late)} to {what}"
        ) from e


class _Segment:
    """The mapping and the name of one segment; owns everything that must be released."""

    def __init__(self, name: str, size: int, owner: shared_memory.SharedMemory | None) -> None:
        self.name = name
        self.owner = owner  # rank 0's handle, kept until unlinked
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR)
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise ValueError(
                    f"shared-memory segment {name} has {actual} bytes, expected {size}: "
                    "world_size or max_bytes differ between ranks"
                )
            self.mmap = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.counters = memoryview(self.mmap).cast("q")  # whole segment as int64; counters at the start
        self.bytes = torch.frombuffer(self.mmap, dtype=torch.uint8)

    def unlink(self) -> None:
        if self.owner is not None:
            owner, self.owner = self.owner, None
            owner.unlink()  # also unregisters it from the resource tracker

    def close(self) -> None:
        self.unlink()
        if self.mmap is None:
            return
        self.counters.release()
        self.bytes = None
        try:
            self.mmap.close()
        except BufferError:
            pass  # a view still lives (e.g. in a kept traceback); the kernel unmaps when it dies
        self.mmap = None


class ShmAllReduce:
    """Sum-all-reduce over the ranks of one host through a shared-memory segment.

    Collective construction: every rank of the group passes the same ``prefix``, ``world_size`` and
    ``max_bytes``; rank 0 creates the segment and publishes its name in ``store``. A prefix names
    one group on one store: build a second group on the same store with another prefix.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        store: dist.Store,
        *,
        prefix: str = "tpinfer-shm",
        max_bytes: int = 8 << 20,
        timeout_s: float = 60.0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if max_bytes < _CACHE_LINE:
            raise ValueError(f"max_bytes={max_bytes} is below {_CACHE_LINE}")
        if not is_supported():
            raise RuntimeError(
                f"shared-memory all-reduce needs Linux x86-64 with {SHM_DIR} "
                f"(this is {sys.platform} {platform.machine()}); use the gloo all-reduce"
            )
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.calls = 0
        self.bytes = 0
        self._round = 0
        self._plans: dict[tuple[torch.dtype, torch.Size], tuple] = {}
        self._unusable = ""
        self._slot_bytes = -(-max_bytes // _CACHE_LINE) * _CACHE_LINE
        self._data_offset = -(-world_size * _CACHE_LINE // _PAGE) * _PAGE
        self._own_index = rank * _COUNTER_STRIDE
        self._peer_indices = tuple(r * _COUNTER_STRIDE for r in range(world_size) if r != rank)
        cores = len(os.sched_getaffinity(0))
        self._spins = _SPINS if world_size <= cores else _OVERSUBSCRIBED_SPINS
        self._segment: _Segment | None = None
        if world_size > 1:
            size = self._data_offset + 2 * world_size * self._slot_bytes
            self._segment = _open_segment(rank, world_size, store, prefix, size, timeout_s)
            self._seq = self._segment.counters
        self._native: Any = None  # kernels.ShmGroup, see native_group
        self._finalizer = weakref.finalize(self, _Segment.close, self._segment) if self._segment else None
        self._store, self._prefix = store, prefix
        self._shared: tuple[torch.Tensor, torch.Tensor] | None = None  # see shared_buffers
        self._shared_finalizer: Any = None

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; bitwise identical on every rank. Returns it."""
        plan = self._plans.get((tensor.dtype, tensor.shape))
        if plan is not None and tensor.is_cpu:
            self._exchange(plan, tensor)
            self.calls += 1
            self.bytes += plan[2]
            return tensor
        return self._all_reduce_uncached(tensor)

    def exchange(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """Publish ``tensor`` and wait for every rank's contribution; return them in rank order, as views of the
        segment, for a caller that sums them itself along with more work (the encoder's fused sum and LayerNorm).
        The views stay valid until this rank's next collective on the group (the double buffering of
        ``_exchange``). None where one slot cannot hold the tensor (the caller all-reduces instead)."""
        plan = self._exchange_plan(tensor)
        if plan is None:
            return None
        _, first, second, rest, _ = self._publish(plan, tensor)
        return (first, second, *rest)

    # Sums split by rows (a reduce-scatter whose gather costs nothing): each rank sums and finishes its own share of
    # the rows and writes it into a buffer every rank maps (shared_buffers); after a barrier every rank reads the
    # whole result there. Half the summing and half the copying of an all-reduce at two ranks, for one more wait.

    def own_rows(self, rows: int) -> tuple[int, int]:
        """This rank's share ``[start, stop)`` of ``rows`` rows: contiguous, in rank order, sizes within one."""
        return rows * self.rank // self.world_size, rows * (self.rank + 1) // self.world_size

    def exchange_rows(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """Publish the rows of ``tensor`` (rows x ...) that the other ranks own and wait for theirs; return every
        rank's rows ``own_rows`` of its tensor, in rank order (this rank's own: a view of ``tensor``, the others' views
        of the segment, valid until this rank's next collective on the group). None where a slot cannot hold it."""
        if not tensor.is_contiguous():
            raise ValueError("exchange_rows needs a contiguous tensor")
        plan = self._exchange_plan(tensor)
        if plan is None:
            return None
        share = self.own_rows(tensor.shape[0])
        _, first, second, rest, _ = self._publish(plan, tensor, share)
        start, stop = share
        return tuple((tensor if r == self.rank else view)[start:stop] for r, view in enumerate((first, second, *rest)))

    def barrier(self) -> None:
        """A round without data: returns once every rank has entered it (and so finished what came before)."""
        self._check_usable()
        self._enter_round()

    def _check_usable(self) -> None:
        if self._unusable:
            raise RuntimeError(f"rank {self.rank}: shared-memory all-reduce used after {self._unusable}")

    def _exchange_plan(self, tensor: torch.Tensor) -> tuple | None:
        """The plan to exchange ``tensor`` in one round (counted), or None where a slot cannot hold it."""
        self._check_usable()
        if not tensor.is_cpu or tensor.dtype not in _ACCUMULATE or tensor.nbytes > self.max_bytes:
            return None
        plan = self._plan(tensor.dtype, tensor.shape)
        self.calls += 1
        self.bytes += plan[2]
        return plan

    def shared_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Two buffers of ``max_bytes`` (uint8) that every rank of the group maps, in one more segment. Collective the
        first time (every rank calls it at the same point), then cached. A rank writes only its own rows of them;
        what orders the writes and reads is the caller's (exchange_rows and barrier rounds)."""
        if self._shared is None:
            self._check_usable()
            segment = _open_segment(self.rank, self.world_size, self._store, f"{self._prefix}/shared",
                                    2 * self._slot_bytes, self.timeout_s)
            self._shared_finalizer = weakref.finalize(self, _Segment.close, segment)
            data = segment.bytes
            self._shared = (data[: self.max_bytes], data[self._slot_bytes : self._slot_bytes + self.max_bytes])
        return self._shared

    def close(self) -> None:
        """Detach (rank 0 also unlinks if that has not happened yet). Safe to call twice."""
        self._plans.clear()
        self._unusable = "it is closed"
        self._shared = None
        if self._shared_finalizer is not None:
            self._shared_finalizer()
        if self._finalizer is not None:
            self._finalizer()

    def _all_reduce_uncached(self, tensor: torch.Tensor) -> torch.Tensor:
        self._check_usable()
        if not tensor.is_cpu:
            raise ValueError(f"shared-memory all-reduce needs a CPU tensor, got one on {tensor.device}")
        if tensor.dtype not in _ACCUMULATE:
            raise ValueError(f"shared-memory all-reduce supports {list(_ACCUMULATE)}, got {tensor.dtype}")
        self.calls += 1
        self.bytes += tensor.nbytes
        if self.world_size == 1 or tensor.numel() == 0:
            return tensor
        capacity = self.max_bytes // tensor.element_size()
        if tensor.numel() <= capacity:
            self._exchange(self._plan(tensor.dtype, tensor.shape), tensor)
            return tensor
        if not tensor.is_contiguous():
            raise ValueError("shared-memory all-reduce chunks large tensors and needs them contiguous")
        flat = tensor.view(-1)
        for start in range(0, flat.numel(), capacity):
            chunk = flat[start : start + capacity]
            self._exchange(self._plan(chunk.dtype, chunk.shape), chunk)
        return tensor

    def _plan(self, dtype: torch.dtype, shape: torch.Size) -> tuple:
        """Views of the segment for one (dtype, shape), per slot: (own, rank 0, rank 1, ranks 2.., scratch)."""
        key = (dtype, shape)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        nbytes = shape.numel() * dtype.itemsize
        accumulate = _ACCUMULATE[dtype]
        scratch = torch.empty(shape, dtype=accumulate) if accumulate is not None else None
        slots = []
        for slot in range(2):
            views = []
            for r in range(self.world_size):
                offset = self._data_offset + (slot * self.world_size + r) * self._slot_bytes
                views.append(self._segment.bytes[offset : offset + nbytes].view(dtype).view(shape))
            slots.append((views[self.rank], views[0], views[1], tuple(views[2:]), scratch))
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        plan = self._plans[key] = (slots[0], slots[1], nbytes)
        return plan

    def _exchange(self, plan: tuple, tensor: torch.Tensor) -> None:
        """One round: publish own data, wait for everyone's, sum in rank order into ``tensor``.

        Double buffering: round k uses slot k % 2. A rank enters round k + 2 (the same slot again)
        only after seeing every counter >= k + 1, i.e. after every rank has entered round k + 1 and
        so has finished reading round k. A fast rank one round ahead writes the other slot, so it
        never overwrites data a slow rank still reads, and no rank can be two rounds ahead.
        """
        self._sum(self._publish(plan, tensor), tensor)

    def _publish(self, plan: tuple, tensor: torch.Tensor, skip: tuple[int, int] | None = None) -> tuple:
        """Start the next round with ``tensor`` as this rank's data (without its rows ``skip``, which no other rank
        reads) and wait for every rank's; the round's slot views."""
        views = plan[(self._round + 1) & 1]
        if skip is None:
            views[0].copy_(tensor)
        else:
            start, stop = skip
            views[0][:start].copy_(tensor[:start])
            views[0][stop:].copy_(tensor[stop:])
        self._enter_round()
        return views

    def _enter_round(self) -> None:
        """The next round: this rank's counter published (after its data: stores are ordered on x86 TSO), then wait
        for every rank's."""
        self._round = round_ = self._round + 1
        self._seq[self._own_index] = round_
        self._await(round_)

    def _await(self, round_: int) -> None:
        """Until every rank has published ``round_``."""
        seq = self._seq
        for index in self._peer_indices:
            if seq[index] < round_:
                self._wait(round_)
                break

    def _sum(self, views: tuple, tensor: torch.Tensor) -> None:
        """The round's slots summed in rank order into ``tensor``."""
        _, first, second, rest, scratch = views
        if scratch is None:
            torch.add(first, second, out=tensor)
            for view in rest:
                tensor.add_(view)
        else:
            scratch.copy_(first)
            scratch.add_(second)
            for view in rest:
                scratch.add_(view)
            tensor.copy_(scratch)

    # Native code (tpinfer.kernels.DecodeStack) runs rounds of this protocol itself, through a ShmGroup that
    # points into this segment. It owns the round counter while it runs: native_group() hands it over,
    # take_back() returns it with the statistics, finish_published() completes a round native code left open.

    def native_group(self) -> Any:
        """This group as ``tpi_decode_stack`` sees it, with the current round; raises once the group is unusable
        (closed, or a timeout broke the rounds' alignment)."""
        self._check_usable()
        if self._native is None:
            from tpinfer import kernels

            group = kernels.ShmGroup()
            base = self._segment.bytes.data_ptr()
            group.counters, group.data, group.slot_bytes = base, base + self._data_offset, self._slot_bytes
            group.world, group.rank, group.stride = self.world_size, self.rank, _COUNTER_STRIDE
            group.spin_s = _NATIVE_SPIN_S if self._spins == _SPINS else 0.0
            group.yield_s = _YIELD_S
            self._native = group
        self._native.round = self._round
        return self._native

    def take_back(self) -> tuple[int, int, float]:
        """After native code ran: adopt its round; returns its (calls, bytes, seconds) since the last call."""
        group = self._native
        self._round = group.round
        calls, nbytes, seconds = group.calls, group.bytes, group.wait_ns / 1e9
        group.calls = group.bytes = group.wait_ns = 0
        self.calls += calls
        self.bytes += nbytes
        return calls, nbytes, seconds

    def finish_published(self, tensor: torch.Tensor) -> None:
        """Complete the round native code left open: this rank's ``tensor`` is published, wait for the others
        (with the usual backoff and timeout) and sum into ``tensor``."""
        round_ = self._native.round
        self._round = round_
        self._await(round_)
        self._sum(self._plan(tensor.dtype, tensor.shape)[round_ & 1], tensor)

    def _wait(self, round_: int) -> None:
        """Until every counter reaches ``round_``: spin, then yield, then sleep with backoff."""
        seq = self._seq
        start = time.monotonic()
        spins = 0
        sleep_s = _FIRST_SLEEP_S
        for index in self._peer_indices:
            while seq[index] < round_:
                spins += 1
                if spins <= self._spins:
                    continue
                waited = time.monotonic() - start
                if waited > self.timeout_s:
                    raise self._timeout(round_)
                if waited < _YIELD_S:
                    os.sched_yield()
                else:
                    time.sleep(sleep_s)
                    sleep_s = min(2 * sleep_s, _MAX_SLEEP_S)

    def _timeout(self, round_: int) -> CollectiveTimeout:
        late = [r for r in range(self.world_size) if self._seq[r * _COUNTER_STRIDE] < round_]
        self._plans.clear()
        self._unusable = "a timeout (the ranks' rounds no longer line up)"
        return CollectiveTimeout(
            f"rank {self.rank}: shared-memory all-reduce round {round_} timed out after {self.timeout_s} s "
            f"waiting for rank(s) {', '.join(map(str, late))} of {self.world_size}"
        )


def _open_segment(rank: int, world_size: int, store: dist.Store, prefix: str, size: int, timeout_s: float) -> _Segment:
    """Rank 0 creates and publishes the segment, the others map it; rank 0 unlinks once all have."""
    name_key = f"{prefix}/segment"
    attached_keys = {r: f"{prefix}/attached/{r}" for r in range(1, world_size)}
    if rank != 0:
        _wait_keys(store, {0: name_key}, timeout_s, rank, "publish the shared-memory segment")
        name = store.get(name_key).decode()
        if name.startswith(_FAILED):
            raise SegmentUnavailable(f"rank {rank}: rank 0 could not create shared-memory segment {prefix!r}: "
                                     f"{name[len(_FAILED):]}")
        try:
            segment = _Segment(name, size, owner=None)
        except FileNotFoundError as e:
            raise RuntimeError(
                f"rank {rank}: shared-memory segment {name} from rank 0 is not in {SHM_DIR}: the ranks are on "
                f"different hosts or containers, or prefix {prefix!r} was used before on this store"
            ) from e
        store.set(attached_keys[rank], b"1")
        return segment

    if store.add(f"{prefix}/created", 1) != 1:
        raise ValueError(f"prefix {prefix!r} was already used for a shared-memory group on this store")
    name = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', prefix)}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        owner = shared_memory.SharedMemory(name, create=True, size=size)
    except OSError as e:
        store.set(name_key, f"{_FAILED}{e}")  # the other ranks raise at once instead of waiting for a name
        raise SegmentUnavailable(f"rank 0: cannot create shared-memory segment {prefix!r} of {size} bytes: {e}") from e
    owner.close()  # every rank, this one too, maps the file itself (see _Segment)
    segment = None
    try:
        try:
            with open(os.path.join(SHM_DIR, name), "rb+") as f:
                os.posix_fallocate(f.fileno(), 0, size)  # ENOSPC now, instead of SIGBUS on first touch
        except OSError as e:
            store.set(name_key, f"{_FAILED}{e}")
            raise SegmentUnavailable(f"rank 0: cannot reserve {size} bytes of {SHM_DIR} for shared-memory segment "
                                     f"{prefix!r}: {e}") from e
        segment = _Segment(name, size, owner)
        store.set(name_key, name)
        _wait_keys(store, attached_keys, timeout_s, rank, "map the shared-memory segment")
    except BaseException:
        if segment is not None:
            segment.close()
        else:
            owner.unlink()
        raise
    segment.unlink()
    logger.debug("rank 0: shared-memory segment %s (%d bytes) mapped by %d ranks", name, size, world_size)
    return segment
