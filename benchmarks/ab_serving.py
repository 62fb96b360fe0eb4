"""Serving throughput of two commits, measured against two live servers in one run, load runs alternating.

    python benchmarks/ab_serving.py --old cdcff58 --new HEAD --model /tmp/llama-250m --dtype bfloat16 \\
        --concurrency 16 --requests-per-client 4 --pairs 12

Each commit is checked out into a temporary git worktree, and a `tpinfer serve` of each is started with this
environment's Python (``PYTHONPATH=<worktree>/src``) and kept up for the whole run: an idle server's workers wait in
a broadcast and take no CPU, so only the one under load runs. Each pair drives both servers in turn with
`serve_load.py`'s client (the same streaming, greedy, ``ignore_eos`` requests), the order alternating between pairs
(old-new, new-old, ...). One server start per commit, not one per repetition: many short repetitions, so that on a
shared machine whose figures drift by 10-50% the median of the per-pair ratios says something. Prints each pair, the
medians and the per-pair ratios, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from ab_commits import REPO, worktree
from serve_load import _body, _free_port, _level, stop_server, wait_healthy


def start(tree: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "tpinfer.cli.main", "serve", "--model", args.model, "--tp", str(args.tp),
           "--dtype", args.dtype, "--port", str(port), "--max-num-seqs", str(args.concurrency),
           "--max-model-len", str(args.max_model_len)]
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(cmd, cwd=tree, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(server, url, 300)
    return server, url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="git revision (driven first in odd pairs)")
    parser.add_argument("--new", default="HEAD", help="git revision (default HEAD)")
    parser.add_argument("--model", required=True, help="checkpoint directory (benchmarks/make_checkpoint.py)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=16, help="clients (and each server's --max-num-seqs)")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=12)
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="tpinfer-ab-serving-") as tmp:
        trees = {"old": worktree(args.old, Path(tmp)), "new": worktree(args.new, Path(tmp))}
        servers: dict[str, tuple[subprocess.Popen, str]] = {}
        try:
            for side, tree in trees.items():
                servers[side] = start(tree, args)
            body = _body(httpx.get(f"{servers['old'][1]}/v1/models").json()["data"][0]["id"], args.max_tokens)
            for pair in range(args.pairs):
                for side in ("old", "new") if pair % 2 == 0 else ("new", "old"):
                    level = asyncio.run(_level(servers[side][1], {}, args.concurrency, args.requests_per_client, body))
                    runs[side].append(level["tokens_per_s"])
                    print(f"pair {pair + 1}: {side} {level['tokens_per_s']:.1f} tokens/s, TTFT p50 "
                          f"{level['ttft_p50_ms']:.0f} ms, per-token p50 {level['per_token_p50_ms']:.1f} ms",
                          file=sys.stderr, flush=True)
        finally:
            for server, _ in servers.values():
                stop_server(server)
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    old, new = statistics.median(runs["old"]), statistics.median(runs["new"])
    ratios = [n / o for o, n in zip(runs["old"], runs["new"], strict=True)]
    print(f"{args.concurrency} clients, {args.dtype}, tp={args.tp}: old median {old:.1f}, new median {new:.1f} "
          f"tokens/s, new/old {new / old:.3f}; per pair {' '.join(f'{r:.3f}' for r in ratios)} "
          f"({sum(r > 1 for r in ratios)} of {len(ratios)} above 1)")
    print(json.dumps({"benchmark": "ab_serving", "old": args.old, "new": args.new, "dtype": args.dtype,
                      "concurrency": args.concurrency, "runs": runs, "old_median": old, "new_median": new,
                      "ratio": new / old, "pair_ratios": ratios, "pair_ratio_median": statistics.median(ratios)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
