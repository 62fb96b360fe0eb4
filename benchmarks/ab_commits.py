"""Decode speed of two commits, measured in one run with their repetitions alternating (old, new, old, new, ...).

    python benchmarks/ab_commits.py --old 45b7c27 --new HEAD --model /tmp/llama-250m --dtype float32,bfloat16 \\
        --tensor-parallel-size 2 --pairs 6

Each commit is checked out once into a temporary git worktree and run with this environment's Python
(``PYTHONPATH=<worktree>/src``), so both use the same torch and libraries; each repetition is one
``tpinfer bench --json`` (its own load, warm-up and timed decode). On a shared machine figures drift by 10-50%
between runs, so only the ratio of the medians of interleaved repetitions means anything. Prints a table and ends
with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worktree(rev: str, root: Path) -> Path:
    path = root / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(path), rev], check=True,
                   capture_output=True)
    return path


def bench(tree: Path, args: argparse.Namespace, dtype: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tpinfer.cli.main", "bench", "--model", args.model, "--tensor-parallel-size",
           str(args.tensor_parallel_size), "--dtype", dtype, "--input-len", str(args.input_len), "--output-len",
           str(args.output_len), "--repeat", str(args.repeat), "--json"]
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"bench at {tree.name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="git revision measured first in every pair")
    parser.add_argument("--new", default="HEAD", help="git revision measured second (default HEAD)")
    parser.add_argument("--model", required=True, help="checkpoint directory (benchmarks/make_checkpoint.py)")
    parser.add_argument("--dtype", default="float32,bfloat16", help="comma-separated dtypes (default both)")
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions inside each bench (default 3)")
    parser.add_argument("--pairs", type=int, default=4, help="alternating old/new pairs per dtype (default 4)")
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="tpinfer-ab-") as tmp:
        trees = {"old": worktree(args.old, Path(tmp)), "new": worktree(args.new, Path(tmp))}
        try:
            for dtype in args.dtype.split(","):
                runs = results[dtype] = {"old": [], "new": []}
                for pair in range(args.pairs):
                    for side in ("old", "new"):
                        tokens_per_s = bench(trees[side], args, dtype)["decode_tokens_per_s"]
                        runs[side].append(tokens_per_s)
                        print(f"{dtype} pair {pair + 1}: {side} {tokens_per_s:.2f} tokens/s", file=sys.stderr,
                              flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    summary = {}
    print(f"{'dtype':<10} {'old median':>11} {'new median':>11} {'new/old':>8}   per pair new/old")
    for dtype, runs in results.items():
        old, new = statistics.median(runs["old"]), statistics.median(runs["new"])
        pairs = [n / o for o, n in zip(runs["old"], runs["new"], strict=True)]
        summary[dtype] = {"old": runs["old"], "new": runs["new"], "old_median": old, "new_median": new,
                          "ratio": new / old, "pair_ratios": pairs, "pair_ratio_median": statistics.median(pairs)}
        print(f"{dtype:<10} {old:>11.2f} {new:>11.2f} {new / old:>8.3f}   {' '.join(f'{r:.3f}' for r in pairs)}")
    print(json.dumps({"old": args.old, "new": args.new, "tensor_parallel_size": args.tensor_parallel_size,
                      "model": args.model, "results": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
