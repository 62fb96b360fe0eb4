"""Measurements every rank takes part in, for ``tpinfer bench``.

Rank 0 calls ``collect(engine, kind, **args)``: it sends ``messages.Bench(kind, args)``, every rank runs
``run_op`` on the same message, and each rank's result is gathered to rank 0.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from tpinfer import kernels
from tpinfer.engine import messages
from tpinfer.engine.runtime import RankEngine
from tpinfer.loading import hugepages


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _stats(engine: RankEngine, reset: bool = False, timed: bool | None = None, batch: int = 1) -> dict[str, Any]:
    comm = engine.ctx.comm
    out = {
        "rank": engine.ctx.rank,
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
        # Whether decode steps run the native kernels: built here, and a plan the model's kernels implement.
        "native_kernels": engine.native_decode,
        "peak_rss_bytes": peak_rss_bytes(),
        "param_bytes": engine.param_bytes,
        # Anonymous memory in transparent huge pages (the weight arena, see tpinfer.loading.hugepages), or None.
        "huge_page_bytes": hugepages.huge_page_bytes(),
        "comm": comm.stats.snapshot(),
        "all_reduce_backend": type(comm.all_reduce_impl).__name__ if comm.all_reduce_impl else "process group",
    }
    pipe = engine.ctx.pipe
    from tpinfer.benchmark import head_format, weight_bytes_per_step

    out["weight_bytes_per_step"] = weight_bytes_per_step(engine, batch)
    load = getattr(engine.model, "expert_load", None)
    out["expert_load"] = load() if load is not None else {}
    out["lm_head"] = head_format(engine)
    out["stage"] = engine.ctx.pp_rank
    out["layers"] = list(engine.model.model.layers.indices)
    out["pipe"] = pipe.stats.snapshot() if pipe is not None else {}
    if reset:
        comm.stats.reset()
        if pipe is not None:
            pipe.stats.reset()
        if hasattr(engine.model, "reset_expert_load"):
            engine.model.reset_expert_load()
    if timed is not None:
        comm.stats.timed = timed
    return out


def _bandwidth(engine: RankEngine, megabytes: int = 256, reps: int = 7) -> dict[str, Any]:
    """STREAM-like reads of a float32 matrix larger than the caches, on every rank at once: torch's GEMV over
    ordinary pages, and over huge pages the engine's own GEMV (the native kernel where it runs, else torch's),
    as the weights are held. Seconds per repetition by method; the caller takes the fastest method."""
    cols = 4096
    rows = megabytes * (1 << 20) // (4 * cols)
    vector = torch.randn(cols)
    plain = torch.randn(rows, cols)
    reads = {"torch_gemv": lambda: torch.mv(plain, vector)}
    arena = hugepages.WeightArena(rows * cols * 4) if hugepages.enabled() else None
    if arena is not None:
        huge = arena.tensor.view(torch.float32).view(rows, cols)
        huge.copy_(plain)
        row = vector[None]
        reads["huge_pages_gemv"] = (lambda: kernels.linear(row, huge)) if kernels.usable(huge) else (
            lambda: torch.mv(huge, vector))
    seconds: dict[str, list[float]] = {}
    for name, read in reads.items():
        read()  # touch every page once
        times = seconds[name] = []
        for _ in range(reps):
            engine.ctx.replica.barrier()
            start = time.perf_counter()
            read()
            times.append(time.perf_counter() - start)
    return {"bytes": rows * cols * 4, "seconds": seconds}


def _all_reduce_latency(engine: RankEngine, numel: int, iters: int = 300) -> dict[str, Any]:
    """Median microseconds of an all-reduce of ``numel`` float32: the shared-memory path and gloo."""
    comm = engine.ctx.comm
    out: dict[str, Any] = {}
    tensor = torch.ones(numel)
    paths = {"gloo": lambda t: dist.all_reduce(t, group=comm.group)}
    if comm.all_reduce_impl is not None:
        paths["shm"] = comm.all_reduce_impl.all_reduce_
    for name in paths:
        out[name] = []
    for _ in range(3):  # alternate the paths so drift on a shared machine hits both alike
        for name, fn in paths.items():
            for _ in range(20):
                fn(tensor)
            samples = []
            for _ in range(iters // 3):
                start = time.perf_counter()
                fn(tensor)
                samples.append(time.perf_counter() - start)
            out[name] += samples
    return {name: statistics.median(samples) * 1e6 for name, samples in out.items()}


OPS = {"stats": _stats, "bandwidth": _bandwidth, "all_reduce_latency": _all_reduce_latency}


def run_op(engine: RankEngine, message: messages.Bench) -> list[Any]:
    """Every rank: run the measurement and gather every rank's result (rank order)."""
    result = OPS[message.kind](engine, **message.args)
    return engine.ctx.replica.all_gather_object(result)


def collect(engine: RankEngine, kind: str, **args: Any) -> list[Any]:
    """Rank 0: have every rank run ``kind`` and return their results."""
    return run_op(engine, messages.send(engine.ctx, messages.Bench(kind, args)))
