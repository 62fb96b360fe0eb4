"""ShmAllReduce with real processes: against gloo, bitwise across ranks, many rounds, timeouts, cleanup.

Spawning a rank costs seconds here (torch import), so each test spawns one group and runs several
checks in it; a failing check's traceback names it.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tpinfer.parallel.shm import (
    SHM_DIR,
    CollectiveTimeout,
    SegmentUnavailable,
    ShmAllReduce,
    all_ranks_on_one_host,
    is_supported,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not is_supported(), reason="shared-memory all-reduce needs Linux x86-64 with /dev/shm"),
]

GROUP_TIMEOUT_S = 30.0
SMALL_MAX_BYTES = 64 << 10  # so a 40_001-element tensor runs as several rounds
SHAPES = [(1, 1024), (1,), (3, 7), (1, 1023), (2, 5, 33), (40_001,), (3, 20_000)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Unit roundoff: half an ulp at 1.0.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _leftovers(prefix: str) -> list[str]:
    return [name for name in os.listdir(SHM_DIR) if name.startswith(prefix)]


def _spawn(fn, world_size: int, *args, timeout_s: float = 100.0) -> None:
    """Run fn(rank, world_size, *args) in world_size spawned processes; fail if they outlive timeout_s."""
    context = mp.start_processes(fn, args=(world_size, *args), nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"{world_size} ranks did not finish within {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _init_group(rank: int, world_size: int, tmp_path: Path) -> dist.Store:
    torch.set_num_threads(1)
    store = dist.FileStore(str(tmp_path / "store"), world_size)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=GROUP_TIMEOUT_S)
    )
    return store


def _contribution(case: int, rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Rank's input for a case; every rank can recompute every other rank's."""
    generator = torch.Generator().manual_seed(1000 * case + rank)
    return torch.randn(shape, generator=generator).to(dtype)


def _assert_same_on_all_ranks(result: torch.Tensor, world_size: int) -> None:
    bits = result.reshape(-1).view(torch.int16 if result.element_size() == 2 else torch.int32).int()  # gloo: no int16
    gathered = [torch.empty_like(bits) for _ in range(world_size)]
    dist.all_gather(gathered, bits)  # reason: compare every rank's result with rank 0's, bit for bit
    for rank, other in enumerate(gathered):
        assert torch.equal(other, gathered[0]), f"rank {rank}'s result differs from rank 0's"


def _check_matches_gloo(rank: int, world_size: int, shm: ShmAllReduce) -> None:
    """Each result is the documented sum, close to gloo's, and identical on every rank.

    Documented: the contributions summed in rank order in float32 (fp32 inputs as they are, bf16 and
    fp16 upcast exactly), rounded once to the dtype; so it must equal that bit for bit. Against gloo,
    with u the dtype's unit roundoff and S = sum_r |x_r| per element: ours is within
    (u + (W-1) 2^-24) S of the exact sum (float32 accumulation, one rounding) and gloo, which sums in
    the dtype, within (W-1) u S to first order; so they differ by at most W (u + 2^-24) S, checked
    with a factor 1.01 for second-order terms.
    """
    expected_bytes = 0
    for case, (shape, dtype) in enumerate((s, d) for s in SHAPES for d in DTYPES):
        inputs = [_contribution(case, r, shape, dtype) for r in range(world_size)]
        ours = inputs[rank].clone()
        assert shm.all_reduce_(ours) is ours
        expected_bytes += ours.nbytes
        theirs = inputs[rank].clone()
        dist.all_reduce(theirs)  # reason: the reference result
        label = f"{tuple(shape)} {dtype}"
        assert torch.equal(ours, functools.reduce(torch.add, [x.float() for x in inputs]).to(dtype)), label
        scale = torch.stack([x.double().abs() for x in inputs]).sum(0)
        bound = 1.01 * world_size * (UNIT_ROUNDOFF[dtype] + 2.0**-24) * scale
        assert ((ours.double() - theirs.double()).abs() <= bound).all(), f"{label}: too far from gloo"
        _assert_same_on_all_ranks(ours, world_size)
    # A non-contiguous tensor that fits one slot is reduced in place through its strides.
    inputs = [_contribution(99, r, (33, 5), torch.float32).t() for r in range(world_size)]
    ours = inputs[rank].clone(memory_format=torch.preserve_format)
    shm.all_reduce_(ours)
    assert ours.stride() == inputs[rank].stride()
    assert torch.equal(ours, functools.reduce(torch.add, inputs))
    calls = len(SHAPES) * len(DTYPES) + 1
    assert (shm.calls, shm.bytes) == (calls, expected_bytes + ours.nbytes)


def _check_many_rounds(rank: int, world_size: int, shm: ShmAllReduce, rounds: int = 2000) -> None:
    """Consecutive rounds of varying shapes, dtypes and chunk counts, with random per-rank delays.

    Every value is a small integer, exact in every dtype, and changes from round to round, so a rank
    that read another round's slot, or a stale slot, would get a different sum.
    """
    rng = random.Random(rank)
    kinds = [((1, 1024), torch.float32), ((1, 1500), torch.float32), ((7,), torch.bfloat16), ((3000,), torch.float16)]
    for i in range(rounds):
        shape, dtype = kinds[i % len(kinds)]
        pattern = 1 + (i + torch.arange(shape[-1])) % 7
        x = ((rank + 1) * pattern).to(dtype).expand(shape).contiguous()
        draw = rng.random()
        if draw < 0.05:
            time.sleep(rng.random() * 300e-6)
        elif draw < 0.10:
            os.sched_yield()
        shm.all_reduce_(x)
        expected = (world_size * (world_size + 1) // 2 * pattern).to(dtype).expand(shape)
        assert torch.equal(x, expected), f"rank {rank}, round {i}: wrong sum"
    # A late rank: the others wait for it (past the polling, into the backoff), then still get the sum.
    if rank == world_size - 1:
        time.sleep(0.05)
    x = torch.full((1, 1024), float(rank + 1))
    shm.all_reduce_(x)
    assert torch.equal(x, torch.full((1, 1024), float(world_size * (world_size + 1) // 2)))


def _check_sums_split_by_rows(rank: int, world_size: int, shm: ShmAllReduce, rounds: int = 300) -> None:
    """A sum split by rows, as the native encoder runs it: exchange_rows gives this rank every rank's partial of its
    own rows, it writes their sum into a shared buffer, a barrier, and every rank reads the whole sum there. Rounds
    alternate the two buffers with random delays, so a rank that wrote before the others finished reading, or read
    before they wrote, would see another round's values."""
    shares = [None] * world_size
    for rows in (0, 1, 3, 7, 64):
        dist.all_gather_object(shares, shm.own_rows(rows))  # reason: every rank's share, to check they tile the rows
        assert shares[0][0] == 0 and shares[-1][1] == rows
        assert all(a[1] == b[0] for a, b in itertools.pairwise(shares))
        assert max(b - a for a, b in shares) - min(b - a for a, b in shares) <= 1
    buffers = shm.shared_buffers()
    assert shm.shared_buffers() is buffers and all(b.numel() == shm.max_bytes for b in buffers)
    rng = random.Random(rank)
    for i in range(rounds):
        rows = (1, 5, 64, 127)[i % 4]  # 127 x 8 floats: nearly a whole slot
        partials = [_contribution(i, r, (rows, 8), torch.float32) for r in range(world_size)]
        start, stop = shm.own_rows(rows)
        if rng.random() < 0.1:
            time.sleep(rng.random() * 300e-6)
        parts = shm.exchange_rows(partials[rank].clone())
        assert len(parts) == world_size
        for r, part in enumerate(parts):
            assert torch.equal(part, partials[r][start:stop]), f"rank {rank}, round {i}: rank {r}'s rows"
        total = buffers[i % 2][: rows * 8 * 4].view(torch.float32).view(rows, 8)
        torch.sum(torch.stack(parts), 0, out=total[start:stop])
        if rng.random() < 0.1:
            time.sleep(rng.random() * 300e-6)
        shm.barrier()
        assert torch.equal(total, torch.stack(partials).sum(0)), f"rank {rank}, round {i}: the gathered sum"
    assert shm.exchange_rows(torch.zeros(shm.max_bytes // 4 + 1)) is None  # more than a slot: the caller all-reduces
    with pytest.raises(ValueError, match="contiguous"):
        shm.exchange_rows(torch.zeros(8, 4).t())


def _check_buffers_refused(rank: int, world_size: int, shm: ShmAllReduce) -> None:
    """/dev/shm too full for the split sums' buffers (rank 0's reservation fails): every rank gets the error at once,
    not after the group's timeout, and the communicator falls back to all-reduces on every rank."""
    from tpinfer.parallel.comm import Communicator

    real = os.posix_fallocate
    if rank == 0:
        os.posix_fallocate = lambda *args: (_ for _ in ()).throw(OSError(28, "No space left on device"))
    try:
        comm = Communicator(None, rank, world_size, torch.device("cpu"), all_reduce_impl=shm)
        start = time.monotonic()
        assert comm.shared_rows(1 << 20) is None and comm.shared_rows(1 << 20) is None
        assert time.monotonic() - start < GROUP_TIMEOUT_S / 2
        with pytest.raises(SegmentUnavailable, match="No space left on device"):
            ShmAllReduce(rank, world_size, dist.distributed_c10d._get_default_store(), prefix=f"{shm._prefix}-again",
                         max_bytes=4096, timeout_s=GROUP_TIMEOUT_S)
    finally:
        os.posix_fallocate = real
    x = torch.full((4,), float(rank + 1))
    shm.all_reduce_(x)  # the group itself still works
    assert torch.equal(x, torch.full((4,), float(world_size * (world_size + 1) // 2)))


def _group_worker(rank: int, world_size: int, tmp_path: Path, prefix: str) -> None:
    store = _init_group(rank, world_size, tmp_path)
    assert all_ranks_on_one_host(rank, world_size, store, prefix=f"{prefix}-host", timeout_s=GROUP_TIMEOUT_S)
    shm = ShmAllReduce(rank, world_size, store, prefix=prefix, max_bytes=SMALL_MAX_BYTES, timeout_s=GROUP_TIMEOUT_S)
    dist.barrier()  # reason: rank 0 unlinks when it has seen every rank map the segment; others return earlier
    assert not _leftovers(prefix), "the segment's name outlived the construction"
    _check_matches_gloo(rank, world_size, shm)
    shm.close()

    shm = ShmAllReduce(rank, world_size, store, prefix=f"{prefix}-rounds", max_bytes=4096, timeout_s=GROUP_TIMEOUT_S)
    _check_many_rounds(rank, world_size, shm)
    _check_sums_split_by_rows(rank, world_size, shm)
    shm.close()
    shm = ShmAllReduce(rank, world_size, store, prefix=f"{prefix}-full", max_bytes=4096, timeout_s=GROUP_TIMEOUT_S)
    _check_buffers_refused(rank, world_size, shm)
    shm.close()
    shm.close()
    assert not _leftovers(prefix), "a segment's name outlived the group"
    for call in (lambda: shm.all_reduce_(torch.ones(4)), lambda: shm.exchange_rows(torch.ones(4)), shm.barrier):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    dist.barrier()  # reason: no rank tears down the group while another still reduces
    dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 4])
def test_matches_gloo_identical_on_all_ranks_and_many_rounds(world_size: int, tmp_path: Path) -> None:
    prefix = f"tpinfer-test-{uuid.uuid4().hex[:8]}"
    _spawn(_group_worker, world_size, tmp_path, prefix)
    assert not _leftovers(prefix)


def _timeout_worker(rank: int, world_size: int, tmp_path: Path, prefix: str) -> None:
    timeout_s, margin_s = 2.0, 3.0
    store = _init_group(rank, world_size, tmp_path)
    # 1. Rank 1 never constructs: rank 0's constructor gives up and unlinks what it created.
    if rank == 0:
        start = time.monotonic()
        with pytest.raises(CollectiveTimeout, match=r"rank 0: timed out after 2.0 s waiting for rank\(s\) 1 "):
            ShmAllReduce(0, world_size, store, prefix=f"{prefix}-never", timeout_s=timeout_s)
        assert timeout_s <= time.monotonic() - start <= timeout_s + margin_s
        assert not _leftovers(f"{prefix}-never")
    dist.barrier()  # reason: rank 1 sits out the construction above

    # 2. Both construct and reduce, then rank 1 stops arriving: rank 0 times out naming rank 1.
    shm = ShmAllReduce(rank, world_size, store, prefix=prefix, timeout_s=timeout_s)
    x = torch.ones(1, 1024)
    shm.all_reduce_(x)
    assert torch.equal(x, torch.full((1, 1024), float(world_size)))
    if rank == 0:
        start = time.monotonic()
        with pytest.raises(CollectiveTimeout, match=r"round 2 timed out after 2.0 s waiting for rank\(s\) 1 of 2"):
            shm.all_reduce_(x)
        assert timeout_s <= time.monotonic() - start <= timeout_s + margin_s
        with pytest.raises(RuntimeError, match="after a timeout"):
            shm.all_reduce_(x)
        store.set(f"{prefix}/done", b"1")
    else:
        store.wait([f"{prefix}/done"], timedelta(seconds=GROUP_TIMEOUT_S))
    # 3. Exit as a crash would, without close() or atexit handlers: nothing may stay in /dev/shm.
    os._exit(0)


def test_absent_rank_raises_collective_timeout_and_crash_leaves_nothing(tmp_path: Path) -> None:
    prefix = f"tpinfer-test-{uuid.uuid4().hex[:8]}"
    _spawn(_timeout_worker, 2, tmp_path, prefix)
    assert not _leftovers(prefix)


def test_single_rank_is_a_no_op_and_rejects_unsupported_tensors() -> None:
    shm = ShmAllReduce(0, 1, dist.HashStore())
    x = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(shm.all_reduce_(x), torch.arange(6.0).reshape(2, 3))
    with pytest.raises(ValueError, match="supports"):
        shm.all_reduce_(torch.arange(3))
    assert (shm.calls, shm.bytes) == (1, 24)
    shm.close()
    shm.close()
