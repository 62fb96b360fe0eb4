"""Combining a MoE layer's expert outputs across ranks: an all-reduce of the combined output against an
all-to-all dispatch and combine, timed with real process groups on this host.

Two designs of expert parallelism over W ranks (E experts, top k, rank r owning experts r*E/W .. (r+1)*E/W - 1):

* **all-reduce** (what tpinfer runs, ``--moe-parallel expert``): every rank holds every token (the TP group's
  replicated hidden states), runs its own experts on the tokens that picked them and adds the weighted outputs
  into a (T, hidden) partial; one all-reduce of it combines the layer. Timed through tpinfer's shared-memory
  all-reduce (the decode path) and through gloo.
* **all-to-all**: each rank holds T/W tokens (token-sharded attention); it sends each token's hidden state once
  to every other rank owning one of its k experts (a count exchange, then ``all_to_all_single``), the owners
  return the weighted outputs the same way, and each rank sums its tokens' returns. Through gloo (the only
  all-to-all here: neither the shared-memory segment nor NCCL on this host implements one).

Routing is uniform at random (fixed seed, the same on every rank). Rank 0's per-layer times are reported as
medians over alternating repetitions, with the bytes each design sends per rank; then one JSON line.

    .venv/bin/python benchmarks/moe_combine.py --world-size 2 --hidden 1024
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
from allreduce_latency import finish, spawn

from tpinfer.parallel.shm import ShmAllReduce


@dataclass(frozen=True)
class Args:
    world_size: int
    hidden: int
    experts: int
    top_k: int
    tokens: tuple[int, ...]
    reps: int
    iters: int
    timeout_s: float


@dataclass(frozen=True)
class Row:
    tokens: int
    all_reduce_bytes: int  # the (T, hidden) float32 partial each rank contributes
    all_to_all_bytes: int  # rows rank 0 sends (dispatch + combine)
    shm_all_reduce_us: float | None  # None: larger than the segment's slots (tpinfer then uses gloo)
    gloo_all_reduce_us: float
    gloo_all_to_all_us: float


def _routing(args: Args) -> torch.Tensor:
    """(T, k) experts per token for the largest T, the same on every rank."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(max(args.tokens), args.experts, generator=generator)
    return logits.topk(args.top_k, dim=-1).indices


def _dispatch_combine(x: torch.Tensor, destinations: list[list[int]], world: int, rank: int) -> torch.Tensor:
    """Send each local token's row to its destination ranks, get the (stand-in) expert outputs back, sum them."""
    order = [(r, t) for r in range(world) for t, dests in enumerate(destinations) if r in dests]
    send_counts = torch.tensor([sum(1 for r, _ in order if r == d) for d in range(world)], dtype=torch.int64)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    rows = x[[t for _, t in order]] if order else x.new_empty(0, x.shape[1])
    received = x.new_empty(int(recv_counts.sum()), x.shape[1])
    dist.all_to_all_single(received, rows, recv_counts.tolist(), send_counts.tolist())
    # The owners' experts would run here on `received`; their weighted outputs go back in the same order.
    returned = torch.empty_like(rows)
    dist.all_to_all_single(returned, received, send_counts.tolist(), recv_counts.tolist())
    out = x.clone()  # this rank's own experts' share stays local
    if order:
        out.index_add_(0, torch.tensor([t for _, t in order]), returned)
    return out


def _worker(rank: int, args: Args, store_path: str, result_path: str) -> None:
    torch.set_num_threads(1)
    world = args.world_size
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=args.timeout_s))
    shm = ShmAllReduce(rank, world, store, prefix="moe-combine", timeout_s=args.timeout_s)
    chosen = _routing(args)
    per_rank = args.experts // world
    rows = []
    for tokens in args.tokens:
        full = torch.randn(tokens, args.hidden)
        local_ids = list(range(rank, tokens, world))  # token-sharded: rank r holds tokens r, r + W, ...
        local = full[local_ids]
        destinations = [sorted({int(e) // per_rank for e in chosen[t]} - {rank}) for t in local_ids]
        sent = 2 * sum(len(d) for d in destinations) * args.hidden * 4
        ops = {"gloo_all_to_all": lambda x=local, d=destinations: _dispatch_combine(x, d, world, rank),
               "gloo_all_reduce": lambda x=full: dist.all_reduce(x.clone())}
        if full.nbytes <= shm.max_bytes:
            ops["shm_all_reduce"] = lambda x=full: shm.all_reduce_(x.clone())
        times: dict[str, list[float]] = {name: [] for name in ops}
        for op in ops.values():  # warm up
            op()
        for rep in range(args.reps):
            names = list(ops) if rep % 2 == 0 else list(reversed(ops))
            for name in names:
                dist.barrier()  # reason: start each repetition with the ranks together
                for _ in range(args.iters):
                    start = time.perf_counter_ns()
                    ops[name]()
                    times[name].append((time.perf_counter_ns() - start) / 1e3)
        median = {name: round(statistics.median(t), 1) for name, t in times.items()}
        rows.append(Row(tokens=tokens, all_reduce_bytes=full.nbytes, all_to_all_bytes=sent,
                        shm_all_reduce_us=median.get("shm_all_reduce"), gloo_all_reduce_us=median["gloo_all_reduce"],
                        gloo_all_to_all_us=median["gloo_all_to_all"]))
    finish(rank, shm, rows, result_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (mixtral-500m: 1024)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", default="1,8,64,512", help="tokens per MoE layer, comma-separated")
    parser.add_argument("--reps", type=int, default=6, help="repetitions per design, alternating")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per repetition")
    parser.add_argument("--timeout-s", type=float, default=60.0)
    ns = parser.parse_args()
    if ns.experts % ns.world_size:
        parser.error(f"{ns.experts} experts do not split over {ns.world_size} ranks")
    args = Args(ns.world_size, ns.hidden, ns.experts, ns.top_k, tuple(int(t) for t in ns.tokens.split(",")), ns.reps,
                ns.iters, ns.timeout_s)
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        spawn(_worker, (args, os.path.join(tmp, "store"), result_path), args.world_size, args.timeout_s * 20)
        with open(result_path) as f:
            rows = [Row(**row) for row in json.load(f)]
    print(f"combining one MoE layer over {args.world_size} ranks: hidden {args.hidden}, {args.experts} experts, "
          f"top {args.top_k}, float32; rank 0's medians in us")
    print(f"{'tokens':>7} {'AR bytes':>9} {'A2A bytes':>10} {'shm AR':>8} {'gloo AR':>8} {'gloo A2A':>9} "
          f"{'A2A/best AR':>12}")
    for row in rows:
        best = min(t for t in (row.shm_all_reduce_us, row.gloo_all_reduce_us) if t is not None)
        shm = f"{row.shm_all_reduce_us:8.1f}" if row.shm_all_reduce_us is not None else f"{'-':>8}"
        print(f"{row.tokens:>7} {row.all_reduce_bytes:>9} {row.all_to_all_bytes:>10} {shm} "
              f"{row.gloo_all_reduce_us:>8.1f} {row.gloo_all_to_all_us:>9.1f} {row.gloo_all_to_all_us / best:>11.1f}x")
    print(json.dumps({"benchmark": "moe_combine", "world_size": args.world_size, "hidden": args.hidden,
                      "experts": args.experts, "top_k": args.top_k, "results": [asdict(r) for r in rows]}))


if __name__ == "__main__":
    main()
