"""The quantized GEMV kernels alone: GB/s of stored bytes per process, several processes streaming at once.

    python benchmarks/quant_gemv.py                          # 2 processes (a rank per core), 1 and 8 rows
    python benchmarks/quant_gemv.py --procs 1 --rows 1,4,8 --schemes int4,int4-a8

Each process holds 24 random 2816 x 2048 weights (a TP=2 rank's share of a 1.1B Llama's FFN, larger together
than the caches) in bfloat16 and in every scheme, in huge pages as the engine holds them, and times one pass over
all of them against bfloat16 activations, the median of 7; the processes start each timing together (one
process alone gets the whole memory bus, which decode at TP=2 never does). Ends with one JSON line.

    python benchmarks/quant_gemv.py --in-cache --procs 1 --schemes int4-g128-a8,int8-a8

``--in-cache`` times one 1024 x 2048 weight over and over instead (it stays in L2): what the kernel itself computes,
with memory out of the way, in multiply-adds a second (`cpu_peak.py` gives the instructions' own peaks).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import statistics
import time

N, K, MATRICES, REPEATS = 2816, 2048, 24, 7
IN_CACHE_N, IN_CACHE_CALLS = 1024, 24  # --in-cache: one weight this tall, called this many times a timing


def _into_huge_pages(stored: dict) -> None:
    """Move every tensor into one huge-page mapping (tpinfer.loading.hugepages), where the engine keeps weights."""
    import torch
    from torch import nn

    from tpinfer.loading.hugepages import place_in_huge_pages

    tensors = [(mats, i, key) for mats in stored.values() for i in range(len(mats))
               for key in (mats[i].keys() if isinstance(mats[i], dict) else [None])]
    params = [nn.Parameter(torch.empty_like(mats[i] if key is None else mats[i][key]), requires_grad=False)
              for mats, i, key in tensors]
    arena = place_in_huge_pages(params)
    for param, (mats, i, key) in zip(params, tensors, strict=True):
        param.data.copy_(mats[i] if key is None else mats[i][key])
        if key is None:
            mats[i] = param.data
        else:
            mats[i][key] = param.data
    stored["_arena"] = arena


def _worker(schemes: list[str], rows: list[int], barrier, out, in_cache: bool) -> None:  # noqa: ANN001
    import torch

    from tpinfer import kernels
    from tpinfer.quant.formats import parse, quantize

    torch.set_num_threads(1)
    torch.manual_seed(0)
    n_rows, matrices = (IN_CACHE_N, 1) if in_cache else (N, MATRICES)
    weights = [torch.randn(n_rows, K) for _ in range(matrices)]
    stored = {"bfloat16": [w.bfloat16() for w in weights]}
    for name in schemes:
        stored[name] = [quantize(parse(name), w) for w in weights]
    del weights
    _into_huge_pages(stored)  # as the engine holds its weights
    result: dict[str, dict[int, float]] = {}
    arena = stored.pop("_arena")
    calls = IN_CACHE_CALLS if in_cache else MATRICES
    for name, mats in stored.items():
        nbytes = (n_rows * K * 2 if name == "bfloat16" else
                  sum(t.numel() * t.element_size() for t in mats[0].values()))
        for b in rows:
            x = torch.randn(b, K).bfloat16()
            if name == "bfloat16":
                def step(i: int, x=x, mats=mats) -> None:
                    kernels.linear(x, mats[i])
            else:
                scheme = parse(name)

                def step(i: int, x=x, mats=mats, scheme=scheme) -> None:
                    kernels.quant_linear(x, scheme, mats[i])
            step(0)
            barrier.wait()
            times = []
            for _ in range(REPEATS):
                start = time.perf_counter()
                for i in range(calls):
                    step(i % matrices)
                times.append((time.perf_counter() - start) / calls)
            seconds = statistics.median(times)
            # in cache: multiply-adds a second (G); from memory: stored bytes a second (GB)
            result.setdefault(name, {})[b] = (n_rows * K * b if in_cache else nbytes) / seconds / 1e9
    out.put({"huge_pages": arena is not None, **result})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, default=2, help="processes streaming at once (default 2)")
    parser.add_argument("--rows", default="1,8", help="activation rows (default 1,8)")
    parser.add_argument("--schemes", default="int8,int8-a8,int4,int4-a8,fp8")
    parser.add_argument("--in-cache", action="store_true",
                        help="one L2-resident weight called over and over: G multiply-adds/s instead of GB/s")
    args = parser.parse_args()
    from tpinfer.quant.formats import parse

    # bfloat16 is always timed, as the reference
    schemes = [name for name in args.schemes.split(",") if name != "bfloat16"]
    rows = [int(r) for r in args.rows.split(",")]
    for name in schemes:
        try:
            parse(name)
        except ValueError as e:
            parser.error(str(e))
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(args.procs), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(schemes, rows, barrier, out, args.in_cache))
             for _ in range(args.procs)]
    for p in procs:
        p.start()
    results = []
    while len(results) < len(procs):  # a worker that dies fails the run instead of leaving it waiting
        try:
            results.append(out.get(timeout=5))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise SystemExit(f"quant_gemv: a worker exited with code {dead[0].exitcode} (its traceback is above)") from None
    for p in procs:
        p.join()
    unit = "G mul-adds/s" if args.in_cache else "GB/s per process"
    print(f"{unit:<18}" + "".join(f"{f'{r} row' + ('s' if r > 1 else ''):>16}" for r in rows))
    for name in (n for n in results[0] if n != "huge_pages"):
        cells = ["/".join(f"{res[name][r]:.1f}" for res in results) for r in rows]
        print(f"{name:<18}" + "".join(f"{c:>16}" for c in cells))
    print(json.dumps({"procs": args.procs, "shape": [IN_CACHE_N if args.in_cache else N, K],
                      "g_mul_adds_per_s" if args.in_cache else "gb_per_s": results}))


if __name__ == "__main__":
    main()
