"""The float32 and bfloat16 decode GEMV alone, by row length: G multiply-adds a second, processes streaming at once.

    python benchmarks/float_gemv.py                                  # 2 processes, bfloat16 and float32, 1/4/8 rows
    python benchmarks/float_gemv.py --dtypes bfloat16 --rows 8 --ks 1024,2048,4096 --rounds 3

For each K, each process holds 8 random weights of 4M elements (N = 4M / K rows of K: 8 MiB each in bfloat16,
64 MiB together, larger than the caches) in huge pages, as the engine holds them, and times passes over all of them
with `tpinfer.kernels.linear` against activations of the weight's dtype, the best of 7; the processes start each
timing together (decode at TP=2 runs a rank per core, both streaming). Prints the processes' summed rate per dtype,
rows and K, each round on its own line (the machine's bandwidth moves from run to run: compare within a round), and
ends with one JSON line.

Rows of 4 KiB or more stream more slowly than shorter ones at 2-8 activation rows unless each line is prefetched twice
(see docs/performance.md, "Long weight rows"): this is the benchmark that shows it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

ELEMENTS, MATRICES, REPEATS = 1 << 22, 8, 7


def _worker(dtypes: list[str], rows: list[int], ks: list[int], rounds: int, barrier, out) -> None:  # noqa: ANN001
    import torch

    from tpinfer import kernels
    from tpinfer.loading.hugepages import WeightArena

    torch.set_num_threads(1)
    torch.manual_seed(0)
    result = {}
    for r in range(rounds):
        for name in dtypes:
            dtype = getattr(torch, name)
            size = torch.tensor([], dtype=dtype).element_size()
            for k in ks:
                n = ELEMENTS // k
                arena = WeightArena(MATRICES * n * k * size)
                weights = [arena.tensor[i * n * k * size:(i + 1) * n * k * size].view(dtype).view(n, k)
                           for i in range(MATRICES)]
                for w in weights:
                    w.copy_(torch.randn(n, k))
                for b in rows:
                    x = torch.randn(b, k).to(dtype)
                    for w in weights:  # warm up: pages touched, the library built
                        kernels.linear(x, w)
                    best = float("inf")
                    for _ in range(REPEATS):
                        barrier.wait()
                        start = time.perf_counter()
                        for w in weights:
                            kernels.linear(x, w)
                        best = min(best, time.perf_counter() - start)
                    result[f"{r}/{name}/{b}/{k}"] = MATRICES * n * k * b / best / 1e9
                del weights, arena
    out.put(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=2, help="processes streaming at once (default 2)")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--rows", default="1,4,8", help="activation rows (default 1,4,8)")
    parser.add_argument("--ks", default="1024,2048,4096", help="row lengths K (default 1024,2048,4096)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole sweep (default 1)")
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    rows = [int(r) for r in args.rows.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    for k in ks:
        if k <= 0 or ELEMENTS % k:
            raise SystemExit(f"--ks: {k} does not divide {ELEMENTS} elements")
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(args.procs), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(dtypes, rows, ks, args.rounds, barrier, out)) for _ in range(args.procs)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    total = {key: sum(r[key] for r in results) for key in results[0]}
    print(f"G multiply-adds/s, {args.procs} processes together; weights of {ELEMENTS >> 20}M elements, N = that / K")
    for r in range(args.rounds):
        for name in dtypes:
            for b in rows:
                cells = "  ".join(f"K={k}: {total[f'{r}/{name}/{b}/{k}']:6.1f}" for k in ks)
                print(f"round {r + 1}  {name:9} {b} rows  {cells}")
    print(json.dumps({"procs": args.procs, "elements": ELEMENTS, "g_mul_adds_per_s": total}))


if __name__ == "__main__":
    main()
