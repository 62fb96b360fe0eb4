"""Peak resident memory of each rank after loading, at several TP sizes (each in a fresh process).

    python benchmarks/load_memory.py --model /tmp/llama-1b --sizes 1,2
    python benchmarks/load_memory.py --model /tmp/llama-1b --sizes 1,2 --quantization int4
    python benchmarks/load_memory.py --model /tmp/llama-1b --sizes 1,2x2       # TP=2 x 2 pipeline stages
    (writes a ~1.1B-parameter bfloat16 checkpoint there first if the directory does not exist)

Peak RSS is VmHWM from /proc/<pid>/status of every rank, read right after loading: model weights,
plus whatever the read left mapped, plus the Python/torch runtime (rank 0 also holds the tokenizer, loaded after
the weights). The runtime alone is measured too, in a process that imports what a rank imports and loads nothing
(the floor F): with W the weight bytes at TP=1, no layout can do better than (F + W/2) / (F + W) at TP=2, which
the table prints as "best possible". Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys
from tpinfer import LLM
from tpinfer.engine.bench import collect
tp, _, pp = sys.argv[2].partition("x")
llm = LLM(sys.argv[1], tensor_parallel_size=int(tp), pipeline_parallel_size=int(pp or 1), dtype=sys.argv[3],
          max_model_len=64, progress=False, quantization=sys.argv[4] or None)
ranks = collect(llm.engine, "stats")
print(json.dumps({"tp": int(tp), "pp": int(pp or 1), "load_s": llm.engine.load_s,
                  "peak_rss_bytes": [r["peak_rss_bytes"] for r in ranks], "param_bytes": [r["param_bytes"] for r in ranks]}))
llm.close()
"""

# What every rank holds before it reads a weight: Python, torch and tpinfer's engine and kernels imported.
FLOOR = """
import tpinfer.engine.runtime, tpinfer.kernels
from tpinfer.engine.bench import peak_rss_bytes
print(peak_rss_bytes())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("/tmp/llama-1b"))
    parser.add_argument("--sizes", default="1,2")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", "-q", default="", metavar="SCHEME",
                        help="quantize while loading (int8, int4, ...): the peak of each rank quantizing its slice")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        sys.path.insert(0, str(Path(__file__).parent))
        from make_checkpoint import write_checkpoint

        write_checkpoint(args.model, "llama-1b", args.dtype)
    results = []
    for layout in args.sizes.split(","):  # "2" (TP) or "2x2" (TP x PP)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(args.model), layout, args.dtype,
                               args.quantization],
                              capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    floor = int(subprocess.run([sys.executable, "-c", FLOOR], capture_output=True, text=True,
                               check=True).stdout.split()[-1])
    first = results[0]
    # the whole model's weight bytes, from the first layout's largest rank
    base, weights = max(first["peak_rss_bytes"]), max(first["param_bytes"]) * first["tp"] * first["pp"]
    print(f"{'TPxPP':>5} {'params/rank GiB':>16} {'peak RSS/rank GiB':>18} {'vs first':>8} {'best possible':>13} "
          f"{'load s':>7}")
    for r in results:
        peak = max(r["peak_rss_bytes"])
        r["peak_vs_tp1"] = peak / base
        # every rank keeps the floor; the weights split at best evenly over the ranks of each layout
        r["best_possible_vs_tp1"] = ((floor + weights / (r["tp"] * r["pp"]))
                                     / (floor + weights / (first["tp"] * first["pp"])))
        print(f"{r['tp']:>3}x{r['pp']} {max(r['param_bytes']) / 2**30:>16.2f} {peak / 2**30:>18.2f} {peak / base:>7.0%} "
              f"{r['best_possible_vs_tp1']:>13.0%} {r['load_s']:>7.1f}")
    print(f"floor (Python, torch and tpinfer imported, nothing loaded): {floor / 2**20:.0f} MiB a process",
          file=sys.stderr)
    print(json.dumps({"model": str(args.model), "dtype": args.dtype, "quantization": args.quantization or None,
                      "floor_rss_bytes": floor, "runs": results}))


if __name__ == "__main__":
    main()
