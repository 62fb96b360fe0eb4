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
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--requests", type=int, default=15)
    args = parser.parse_args()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "tpinfer.cli.main", "serve", "--model", args.model, "--tp",
                               str(args.tp), "--dtype", args.dtype, "--port", str(port), "--max-model-len", "512"],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited ({server.returncode}):\n{server.stderr.read()[-3000:]}")
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not come up in 180 s") from None
                time.sleep(0.5)
        name = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"]

        def complete(prompt: str, max_tokens: int) -> None:
            body = json.dumps({"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                               "ignore_eos": True}).encode()
            request = urllib.request.Request(base + "/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            json.load(urllib.request.urlopen(request, timeout=120))

        def counters() -> dict[str, float]:
            text = urllib.request.urlopen(base + "/metrics").read().decode()
            out = {m.group(1): float(m.group(2))
                   for m in re.finditer(r'tpinfer_step_seconds_total\{phase="(\w+)"\} ([0-9.e+-]+)', text)}
            folded = re.search(r"^tpinfer_folded_prefill_steps_total ([0-9.]+)", text, re.M)
            out["folded_steps"] = float(folded.group(1)) if folded else 0.0
            return out

        complete("Warm up the server " * 4, 2)
        results = {}
        for label, extra in (("few new tokens", ""), ("8 more tokens", " word" * 8)):
            before, start = counters(), time.perf_counter()
            for i in range(args.requests):
                complete(f"Request number {i}:{extra} {i * 7919}", 1)
            wall = (time.perf_counter() - start) / args.requests
            after = counters()
            per = {k: (after[k] - before.get(k, 0.0)) / args.requests for k in after}
            results[label] = {"wall_ms": wall * 1e3, **{f"{k}_ms": v * 1e3 for k, v in per.items() if k != "folded_steps"},
                              "folded_share": per["folded_steps"]}
            phases = "  ".join(f"{k} {v * 1e3:.2f} ms" for k, v in per.items() if k != "folded_steps")
            print(f"{label:15} a request: {wall * 1e3:.1f} ms wall; {phases}; folded {per['folded_steps']:.2f}")
        before = counters()
        complete("A decode probe", 40)
        after = counters()
        per_step = {k: (after[k] - before.get(k, 0.0)) / 40 * 1e3 for k in after if k != "folded_steps"}
        results["one-row decode step"] = {f"{k}_ms": v for k, v in per_step.items()}
        print("one-row decode step: " + "  ".join(f"{k} {v:.2f} ms" for k, v in per_step.items()))
        print(json.dumps({"benchmark": "prefill_cost", "model": args.model, "tp": args.tp, "dtype": args.dtype,
                          "requests": args.requests, "results": results}))
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
