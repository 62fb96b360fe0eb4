"""Latency of one all-reduce on this host: shared memory (tpinfer.parallel.shm) against gloo.

Spawns W processes, each with a gloo process group and a ShmAllReduce on the same FileStore, and
times single calls of each, alternating shm and gloo repetitions so drift hits both equally.
Rank 0's per-call times are reported; prints a table, then one JSON line.

    .venv/bin/python benchmarks/allreduce_latency.py --world-size 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tpinfer.parallel.shm import ShmAllReduce

# (shape, dtype): decode messages are (batch, hidden); the last ones show where copies start to count.
CASES = [
    ((1, 1024), torch.float32),
    ((1, 1024), torch.bfloat16),
    ((1, 4096), torch.float32),
    ((8, 4096), torch.float32),
    ((64, 4096), torch.float32),
]


@dataclass(frozen=True)
class Args:
    world_size: int
    reps: int
    iters: int
    warmup: int
    timeout_s: float


@dataclass(frozen=True)
class Row:
    shape: list[int]
    dtype: str
    bytes: int
    calls: int
    shm_p50_us: float
    shm_p90_us: float
    gloo_p50_us: float
    gloo_p90_us: float
    gloo_over_shm: float


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1] if len(values) > 1 else values[0]


def _worker(rank: int, args: Args, store_path: str, result_path: str) -> None:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // args.world_size))
    store = dist.FileStore(store_path, args.world_size)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=args.world_size, timeout=timedelta(seconds=args.timeout_s)
    )
    shm = ShmAllReduce(rank, args.world_size, store, prefix="bench-shm", timeout_s=args.timeout_s)
    backends = {"shm": shm.all_reduce_, "gloo": dist.all_reduce}
    rows = []
    for shape, dtype in CASES:
        source = torch.randn(shape).to(dtype)
        x = source.clone()
        nbytes = x.nbytes
        iters = max(10, args.iters * 4096 // max(nbytes, 4096))
        times: dict[str, list[float]] = {"shm": [], "gloo": []}
        for op in backends.values():
            for _ in range(args.warmup):
                x.copy_(source)
                op(x)
        for rep in range(args.reps):
            order = ("shm", "gloo") if rep % 2 == 0 else ("gloo", "shm")
            for name in order:
                op, out = backends[name], times[name]
                dist.barrier()  # reason: start each repetition with the ranks together
                for _ in range(iters):
                    x.copy_(source)
                    start = time.perf_counter_ns()
                    op(x)
                    out.append((time.perf_counter_ns() - start) / 1e3)
        shm_p50, gloo_p50 = statistics.median(times["shm"]), statistics.median(times["gloo"])
        rows.append(
            Row(
                shape=list(shape),
                dtype=str(dtype).removeprefix("torch."),
                bytes=nbytes,
                calls=len(times["shm"]),
                shm_p50_us=round(shm_p50, 2),
                shm_p90_us=round(_percentile(times["shm"], 90), 2),
                gloo_p50_us=round(gloo_p50, 2),
                gloo_p90_us=round(_percentile(times["gloo"], 90), 2),
                gloo_over_shm=round(gloo_p50 / shm_p50, 2),
            )
        )
    finish(rank, shm, rows, result_path)


def finish(rank: int, shm: ShmAllReduce, rows: list, result_path: str) -> None:
    """Close the segment and the group together, then rank 0 writes its rows (dataclasses) as JSON."""
    shm.close()
    dist.barrier()  # reason: no rank tears down the group while another still communicates
    dist.destroy_process_group()
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump([asdict(row) for row in rows], f)


def spawn(worker, args: tuple, world_size: int, timeout_s: float) -> None:  # noqa: ANN001
    """Run ``worker(rank, *args)`` on ``world_size`` spawned processes; kill them all past ``timeout_s``."""
    context = mp.start_processes(worker, args=args, nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"benchmark did not finish in {timeout_s} s")


def run(args: Args) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        spawn(_worker, (args, os.path.join(tmp, "store"), result_path), args.world_size, args.timeout_s * 10)
        with open(result_path) as f:
            return [Row(**row) for row in json.load(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20, help="repetitions per backend, alternating")
    parser.add_argument("--iters", type=int, default=200, help="timed calls per repetition for a <=4 KiB message")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--timeout-s", type=float, default=60.0)
    ns = parser.parse_args()
    args = Args(ns.world_size, ns.reps, ns.iters, ns.warmup, ns.timeout_s)
    rows = run(args)
    print(f"all-reduce latency, world_size={args.world_size}, {os.cpu_count()} cores; rank 0's per-call times in us")
    print(
        f"{'shape':>10} {'dtype':>9} {'bytes':>8} {'calls':>6} {'shm p50':>8} {'shm p90':>8} "
        f"{'gloo p50':>9} {'gloo p90':>9} {'gloo/shm':>9}"
    )
    for row in rows:
        shape = "x".join(map(str, row.shape))
        print(
            f"{shape:>10} {row.dtype:>9} {row.bytes:>8} {row.calls:>6} {row.shm_p50_us:>8.1f} {row.shm_p90_us:>8.1f} "
            f"{row.gloo_p50_us:>9.1f} {row.gloo_p90_us:>9.1f} {row.gloo_over_shm:>8.1f}x"
        )
    print(
        json.dumps(
            {
                "benchmark": "allreduce_latency",
                "world_size": args.world_size,
                "cores": os.cpu_count(),
                "results": [asdict(row) for row in rows],
            }
        )
    )


if __name__ == "__main__":
    main()
