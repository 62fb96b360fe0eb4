"""What a short prompt costs a server that is otherwise idle: rank 0's step phases per request, from ``/metrics``.

    python benchmarks/prefill_cost.py --model /path/llama-250m --tp 2 --dtype bfloat16

Starts ``tpinfer serve``, warms it up, then sends --requests one-token completions one after another, first with
prompts that differ only in their last tokens (a few tokens computed, the rest from the prefix cache), then with 8
more tokens each; per request: the wall time and the seconds of each phase of ``tpinfer_step_seconds_total``
(schedule, prefill, decode, sample), and how many steps folded their prompt into the decode forward. Then one
request of 40 tokens: the phases per decode step at one row, for comparison. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import httpx
from serve_load import _metrics, _start_server, stop_server

PHASES = ("schedule", "prefill", "decode", "sample")
FOLDED = "tpinfer_folded_prefill_steps_total"


def _counters(url: str) -> dict[str, float]:
    """Rank 0's step seconds by phase and the folded steps so far."""
    metrics = _metrics(url, {})
    out = {p: metrics.get(f'tpinfer_step_seconds_total{{phase="{p}"}}', 0.0) for p in PHASES}
    out["folded_steps"] = metrics.get(FOLDED, 0.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--requests", type=int, default=15)
    args = parser.parse_args()
    # What serve_load.py's _start_server reads: one sequence at a time, a short context, no extra options.
    args.concurrency, args.max_model_len, args.serve_args = [1], 512, ""
    server, url = _start_server(args)
    try:
        client = httpx.Client(base_url=url, timeout=120)  # one connection, kept: the wall time is the server's
        name = client.get("/v1/models").json()["data"][0]["id"]

        def complete(prompt: str, max_tokens: int) -> None:
            body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            client.post("/v1/completions", json=body).raise_for_status()

        complete("Warm up the server " * 4, 2)
        results = {}
        for label, extra in (("few new tokens", ""), ("8 more tokens", " word" * 8)):
            before, start = _counters(url), time.perf_counter()
            for i in range(args.requests):
                complete(f"Request number {i}:{extra} {i * 7919}", 1)
            wall = (time.perf_counter() - start) / args.requests
            per = {k: (v - before[k]) / args.requests for k, v in _counters(url).items()}
            results[label] = {"wall_ms": wall * 1e3, **{f"{p}_ms": per[p] * 1e3 for p in PHASES},
                              "folded_share": per["folded_steps"]}
            phases = "  ".join(f"{p} {per[p] * 1e3:.2f} ms" for p in PHASES)
            print(f"{label:15} a request: {wall * 1e3:.1f} ms wall; {phases}; folded {per['folded_steps']:.2f}")
        before = _counters(url)
        complete("A decode probe", 40)
        after = _counters(url)
        per_step = {p: (after[p] - before[p]) / 40 * 1e3 for p in PHASES}
        results["one-row decode step"] = {f"{p}_ms": v for p, v in per_step.items()}
        print("one-row decode step: " + "  ".join(f"{p} {v:.2f} ms" for p, v in per_step.items()))
        print(json.dumps({"benchmark": "prefill_cost", "model": args.model, "tp": args.tp, "dtype": args.dtype,
                          "requests": args.requests, "results": results}))
    finally:
        stop_server(server)


if __name__ == "__main__":
    main()
