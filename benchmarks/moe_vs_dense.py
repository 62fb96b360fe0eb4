"""Decode speed of a mixture-of-experts checkpoint against a dense one of the same total size, in one run.

Runs ``tpinfer bench --json`` on the MoE model in each ``--moe-parallel`` layout and on the dense model, in
turn, for ``--rounds`` rounds (each run its own processes: this machine's bandwidth drifts from minute to minute,
so the figures are per-round ratios and their medians). Prints a table, then one JSON line.

    python benchmarks/make_checkpoint.py --preset mixtral-500m --out /tmp/mixtral-500m
    python benchmarks/make_checkpoint.py --preset llama-500m-dense --out /tmp/llama-500m-dense
    python benchmarks/moe_vs_dense.py --moe /tmp/mixtral-500m --dense /tmp/llama-500m-dense --tp 2 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def bench(model: str, tp: int, layout: str | None, output_len: int, repeat: int) -> dict:
    cmd = [str(Path(sys.executable).with_name("tpinfer")), "bench", "--model", model, "--tp", str(tp),
           "--output-len", str(output_len), "--repeat", str(repeat), "--json"]
    if layout:
        cmd += ["--moe-parallel", layout]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    d = json.loads(done.stdout.strip().splitlines()[-1])
    return {"tokens_per_s": d["decode_tokens_per_s"], "of_roofline": d["achieved_bandwidth_gb_s"] / d[
        "measured_bandwidth_gb_s"], "bandwidth_gb_s": d["measured_bandwidth_gb_s"], "native": d["native_kernels"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moe", required=True, help="MoE checkpoint directory")
    parser.add_argument("--dense", required=True, help="dense checkpoint of the same total parameters")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    runs = {"tensor": (args.moe, "tensor"), "dense": (args.dense, None), "expert": (args.moe, "expert")}
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, (model, layout) in runs.items():
            results[name].append(bench(model, args.tp, layout, args.output_len, args.repeat))
            print(f"round {r + 1} {name}: {results[name][-1]}", file=sys.stderr, flush=True)
    ratios = [t["tokens_per_s"] / d["tokens_per_s"] for t, d in zip(results["tensor"], results["dense"], strict=True)]
    print(f"decode tok/s at tp={args.tp}, {args.rounds} alternating rounds")
    print(f"{'run':>8} {'tok/s per round':>40} {'median':>7} {'of roofline':>12}")
    summary = {}
    for name, rows in results.items():
        tps = [row["tokens_per_s"] for row in rows]
        share = statistics.median(row["of_roofline"] for row in rows)
        summary[name] = {"tokens_per_s": tps, "median": statistics.median(tps), "of_roofline_median": share,
                         "native": all(row["native"] for row in rows)}
        print(f"{name:>8} {', '.join(f'{t:.1f}' for t in tps):>40} {statistics.median(tps):>7.1f} {share:>12.2f}")
    print(f"MoE (tensor) / dense per round: {', '.join(f'{x:.2f}' for x in ratios)}; median "
          f"{statistics.median(ratios):.2f}")
    print(json.dumps({"benchmark": "moe_vs_dense", "tp": args.tp, "rounds": args.rounds, "runs": summary,
                      "moe_over_dense": ratios, "moe_over_dense_median": statistics.median(ratios)}))


if __name__ == "__main__":
    main()
