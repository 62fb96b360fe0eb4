"""Load benchmark for ``tpinfer serve``: C concurrent streaming clients, for C = 1, 4, 16 by default.

Each client sends streaming completions one after another (greedy, ``ignore_eos`` so every request
generates exactly --max-tokens tokens) until it has sent --requests-per-client. Per concurrency level:
aggregate generated tokens/s (all completion tokens / wall time of the level), time to first token
(request sent -> first text chunk) and per-token latency (a request's (last chunk - first chunk) /
(tokens - 1)), p50 and p99 over requests. A table, then one JSON line.

    python benchmarks/serve_load.py --model src/tpinfer/assets/demo-llama --tp 2          # starts a server
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model-name demo-llama  # uses a running one

Layouts against each other in one run (servers started in turn, alternating over --rounds so drift on a shared
machine hits each alike; medians per layout, ratios to the first, and with pipeline stages the bubble share: the
``tpinfer_pipeline_bubble_seconds_total`` / ``..._busy_seconds_total`` increase over the measured levels):

    python benchmarks/serve_load.py --model /path/llama-250m --dtype float32 --layouts tp1,tp2,pp2 \
        --concurrency 16 --rounds 3

Prefix caching on against off, every prompt starting with the same system prompt of about 200 tokens:

    python benchmarks/serve_load.py --model /path/llama-250m --dtype float32 --tp 2 --concurrency 16 \
        --shared-prefix-tokens 200 --compare-prefix-caching --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

PROMPTS = [
    "The function returns",
    "A list is a mutable sequence of",
    "Return the number of items in",
    "Tensor parallelism splits every weight matrix",
    "The quick brown fox",
    "Hello world, hello tensor parallel",
    "Read the file and return",
    "If the argument is omitted, the default",
]


@dataclass
class Result:
    ttft: float
    per_token: float | None
    tokens: int


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class _Connection:
    """A minimal HTTP/1.1 keep-alive client for streamed POSTs (chunked SSE responses).

    A general client (httpx, openai) spends ~100 us of Python per streamed chunk; with 16 streams on the
    same few cores as the server that would measure the client more than the server.
    """

    def __init__(self, url: str, headers: dict) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_stream(self, path: str, body: dict) -> AsyncIterator[bytes]:
        """Yield each SSE event's data of a POST (the connection is reused for the next call)."""
        payload = json.dumps(body).encode()
        request = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(payload)}\r\n{self.extra}\r\n".encode() + payload)
        for attempt in range(2):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.writer.write(request)
            try:
                head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                break
            except (asyncio.IncompleteReadError, ConnectionResetError):
                # The server closed the idle keep-alive connection (uvicorn does after 5 s, e.g. while the other
                # clients of a level warm up): open a new one and send the request again, once.
                self.close()
                if attempt:
                    raise
        status = int(head.split(" ", 2)[1])
        if status != 200 or "chunked" not in head.lower():
            raise RuntimeError(f"HTTP {status}: {head.splitlines()[0]}")
        pending = b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return
            pending += data[:-2]
            *events, pending = pending.split(b"\n\n")
            for event in events:
                if event.startswith(b"data: "):
                    yield event[6:]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _body(model: str, max_tokens: int) -> dict:
    """A streamed greedy completion of exactly ``max_tokens`` tokens (``ignore_eos``, vLLM's extension too) whose
    last chunk carries the usage, as OpenAI's API gives it on request: any OpenAI-compatible server can be driven."""
    return {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


async def _one(conn: _Connection, body: dict) -> Result:
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async for data in conn.post_stream("/v1/completions", body):
        if data == b"[DONE]":
            continue
        if data.startswith(b'{"error"'):
            raise RuntimeError(json.loads(data)["error"]["message"])
        if b'"choices":[]' in data:  # the usage-only chunk stream_options.include_usage asks for (OpenAI's API)
            tokens = json.loads(data)["usage"]["completion_tokens"]
            continue
        now = time.perf_counter()
        first = first or now
        last = now
    if first is None:
        raise RuntimeError("no tokens streamed")
    per_token = (last - first) / (tokens - 1) if tokens > 1 else None
    return Result(first - start, per_token, tokens)


async def _level(url: str, headers: dict, concurrency: int, requests: int, body: dict, prefix: str = "") -> dict:
    """One concurrency level; every prompt starts with ``prefix`` (a shared system prompt) when given."""
    connections = [_Connection(url, headers) for _ in range(concurrency)]
    try:
        for conn in connections:  # connect, and warm the server's caches
            await _one(conn, {**body, "prompt": prefix + PROMPTS[0], "max_tokens": 4})

        async def worker(c: int) -> list[Result]:
            conn = connections[c]
            return [await _one(conn, {**body, "prompt": prefix + PROMPTS[(c + i) % len(PROMPTS)]})
                    for i in range(requests)]

        before = _metrics(url, headers)
        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(c) for c in range(concurrency))) for r in rs]
        wall = time.perf_counter() - start
        after = _metrics(url, headers)
    finally:
        for conn in connections:
            conn.close()
    ttft = [r.ttft for r in results]
    per_token = [r.per_token for r in results if r.per_token is not None]
    tokens = sum(r.tokens for r in results)
    # tpinfer's own account of rank 0's engine thread over the level (absent for other servers): seconds by phase.
    phases = {name.split('"')[1]: round(after[name] - before.get(name, 0.0), 3) for name in after
              if name.startswith("tpinfer_step_seconds_total")}
    delta = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in (
        "tpinfer_prefill_tokens_total", "tpinfer_prefix_cache_queries_total", "tpinfer_prefix_cache_hits_total")}
    return {
        "phases_s": phases, "prefill_tokens": int(delta["tpinfer_prefill_tokens_total"]),
        "prefix_cache_hit_tokens": int(delta["tpinfer_prefix_cache_hits_total"]),
        "prefix_cache_query_tokens": int(delta["tpinfer_prefix_cache_queries_total"]),
        "concurrency": concurrency, "requests": len(results), "generated_tokens": tokens, "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(1e3 * _percentile(ttft, 50), 1), "ttft_p99_ms": round(1e3 * _percentile(ttft, 99), 1),
        "per_token_p50_ms": round(1e3 * _percentile(per_token, 50), 2),
        "per_token_p99_ms": round(1e3 * _percentile(per_token, 99), 2),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layout(text: str) -> dict[str, int]:
    """"tp2", "pp2", "tp2pp2", "tp1pp2dp1" -> {"tp": 2, "pp": 1, "dp": 1}, ..."""
    import re

    parts = dict.fromkeys(("tp", "pp", "dp"), 1)
    found = re.findall(r"(tp|pp|dp)(\d+)", text)
    if not found or "".join(k + v for k, v in found) != text:
        raise argparse.ArgumentTypeError(f"layout {text!r}: expected e.g. tp2, pp2 or tp2pp2")
    parts.update({k: int(v) for k, v in found})
    return parts


def _metrics(url: str, headers: dict) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", headers=headers, timeout=10).text.splitlines():
        if line.startswith(("tpinfer_pipeline_", "tpinfer_step_seconds_total", "tpinfer_prefill_tokens_total",
                            "tpinfer_prefix_cache_", "tpinfer_folded_prefill_steps_total")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _start_server(args: argparse.Namespace, layout: dict[str, int] | None = None,
                  extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    max_num_seqs = max(args.concurrency)
    mesh = ["--tp", str(args.tp)] if layout is None else [
        "--tp", str(layout["tp"]), "--pp", str(layout["pp"]), "--dp", str(layout["dp"])]
    cmd = [sys.executable, "-m", "tpinfer.cli.main", "serve", "--model", args.model, *mesh,
           "--dtype", args.dtype, "--port", str(port), "--max-num-seqs", str(max_num_seqs),
           "--max-model-len", str(args.max_model_len), *shlex.split(args.serve_args or ""), *extra]
    print("starting:", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(cmd, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(server, url, 300)
    return server, url


def run_levels(server: subprocess.Popen, url: str, args: argparse.Namespace,
               prefix: str = "") -> tuple[list[dict], dict[str, float], dict[str, float]]:
    """Every --concurrency level against a server this script started, then stop it: (levels, /metrics before,
    /metrics after: tpinfer's counters, empty for another server)."""
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        body = _body(model, args.max_tokens)
        before = _metrics(url, {})
        levels = [asyncio.run(_level(url, {}, c, args.requests_per_client, body, prefix)) for c in args.concurrency]
        return levels, before, _metrics(url, {})
    finally:
        stop_server(server)


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to a server this script started (its whole process group), SIGKILL if it is not gone in 60 s."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)


def wait_healthy(server: subprocess.Popen, url: str, timeout_s: float, poll_s: float = 0.5, log: str = "") -> None:
    """Until ``url``/health answers 200; SystemExit (the server killed) if it exits first or ``timeout_s`` passes."""
    see = f"; see {log}" if log else ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}{see}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    os.killpg(server.pid, signal.SIGKILL)
    raise SystemExit(f"the server did not become healthy within {timeout_s} s{see}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (otherwise one is started with --model and --tp)")
    parser.add_argument("--model", help="checkpoint directory for the server this script starts")
    parser.add_argument("--model-name", default=None, help="model name to send (default: the server's first)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--api-key", default=os.environ.get("TPINFER_API_KEY"))
    parser.add_argument("--layouts", type=lambda s: [_layout(x) for x in s.split(",")], default=None,
                        help="compare layouts (tp1,tp2,pp2,tp2pp2...) in one run, each its own server in turn")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --layouts or --compare-prefix-caching: alternate the servers this many times")
    parser.add_argument("--serve-args", default=None, metavar="ARGS",
                        help="more options for the tpinfer serve this script starts, e.g. '--max-num-batched-tokens 256'")
    parser.add_argument("--shared-prefix-tokens", type=int, default=0, metavar="N",
                        help="start every prompt with the same system prompt of about N tokens (the model's tokenizer)")
    parser.add_argument("--compare-prefix-caching", action="store_true",
                        help="a server with prefix caching and one with --no-prefix-caching in turn (alternating over "
                        "--rounds); TTFT and throughput ratios (give --shared-prefix-tokens)")
    args = parser.parse_args()
    if not args.url and not args.model:
        parser.error("give --url of a running server or --model to start one")
    if args.shared_prefix_tokens and not args.model:
        parser.error("--shared-prefix-tokens needs --model (its tokenizer sizes the prefix)")
    args.prefix = _shared_prefix(args.model, args.shared_prefix_tokens) if args.shared_prefix_tokens else ""
    if args.compare_prefix_caching:
        return compare_prefix_caching(args)
    if args.layouts:
        return compare_layouts(args)
    server, url = (None, args.url) if args.url else _start_server(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        model = args.model_name or httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"]
        body = _body(model, args.max_tokens)
        levels = [asyncio.run(_level(url, headers, c, args.requests_per_client, body, args.prefix))
                  for c in args.concurrency]
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)
    base = levels[0]["tokens_per_s"]
    print(f"{'clients':>7} {'requests':>8} {'tokens/s':>9} {'x1':>5} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'tok p50':>8} {'tok p99':>8}   (ms)")
    for lv in levels:
        speedup = lv["tokens_per_s"] / base
        print(f"{lv['concurrency']:>7} {lv['requests']:>8} {lv['tokens_per_s']:>9.1f} {speedup:>5.1f} "
              f"{lv['ttft_p50_ms']:>9.1f} {lv['ttft_p99_ms']:>9.1f} {lv['per_token_p50_ms']:>8.2f} "
              f"{lv['per_token_p99_ms']:>8.2f}")
    for lv in levels:
        if lv["phases_s"]:
            shares = ", ".join(f"{k} {100 * v / lv['wall_s']:.0f}%" for k, v in lv["phases_s"].items())
            idle = 100 * (1 - sum(lv["phases_s"].values()) / lv["wall_s"])
            print(f"{lv['concurrency']:>7} clients, rank 0's engine thread: {shares}, idle {idle:.0f}% "
                  f"({lv['prefill_tokens']} prompt tokens computed, {lv['prefix_cache_hit_tokens']} from the prefix "
                  "cache)")
    summary = {"benchmark": "serve_load", "url": url, "model": model, "tp": None if args.url else args.tp,
               "max_tokens": args.max_tokens, "levels": levels,
               "speedup_max_vs_1": round(levels[-1]["tokens_per_s"] / base, 2),
               "model_path": str(Path(args.model).resolve()) if args.model else None}
    print(json.dumps(summary))
    return 0


def _shared_prefix(model: str, tokens: int) -> str:
    """A system prompt of at least ``tokens`` tokens under the checkpoint's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    words = ("You are a careful assistant for a team that runs tensor-parallel inference on small machines. "
             "Answer briefly, cite the documentation, and say when a figure was measured on which host. ").split()
    text = ""
    while len(tokenizer(text).input_ids) < tokens:
        text += words[len(text.split()) % len(words)] + " "
    return text


def compare_prefix_caching(args: argparse.Namespace) -> int:
    """The same load on a server with prefix caching and one without, alternating; medians and off/on ratios."""
    import statistics

    variants = {"on": (), "off": ("--no-prefix-caching",)}
    runs: dict[str, list[list[dict]]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name in (list(variants) if round_ % 2 == 0 else list(variants)[::-1]):
            levels, _, _ = run_levels(*_start_server(args, extra=variants[name]), args, args.prefix)
            runs[name].append(levels)
            print(f"round {round_} prefix caching {name}: " + ", ".join(
                f"{lv['concurrency']} clients TTFT p50 {lv['ttft_p50_ms']:.0f} ms, {lv['tokens_per_s']:.1f} tok/s"
                for lv in levels), file=sys.stderr, flush=True)
    print(f"shared prefix of {args.shared_prefix_tokens} tokens, {args.requests_per_client} requests per client, "
          f"{args.rounds} round(s), medians")
    print(f"{'clients':>7} {'TTFT on':>8} {'TTFT off':>9} {'off/on':>7} {'tok/s on':>9} {'tok/s off':>10} "
          f"{'hit tokens':>11}")
    summary = {"benchmark": "serve_load_prefix_caching", "shared_prefix_tokens": args.shared_prefix_tokens,
               "max_tokens": args.max_tokens, "rounds": args.rounds, "levels": [],
               "model_path": str(Path(args.model).resolve())}
    for i, c in enumerate(args.concurrency):
        med = {name: {key: statistics.median(r[i][key] for r in runs[name])
                      for key in ("ttft_p50_ms", "tokens_per_s", "prefix_cache_hit_tokens", "prefill_tokens")}
               for name in variants}
        ratio = med["off"]["ttft_p50_ms"] / med["on"]["ttft_p50_ms"]
        print(f"{c:>7} {med['on']['ttft_p50_ms']:>8.1f} {med['off']['ttft_p50_ms']:>9.1f} {ratio:>7.2f} "
              f"{med['on']['tokens_per_s']:>9.1f} {med['off']['tokens_per_s']:>10.1f} "
              f"{med['on']['prefix_cache_hit_tokens']:>11.0f}")
        summary["levels"].append({"concurrency": c, "on": med["on"], "off": med["off"], "ttft_off_over_on": ratio,
                                  "runs": {name: [r[i] for r in runs[name]] for name in variants}})
    print(json.dumps(summary))
    return 0


def compare_layouts(args: argparse.Namespace) -> int:
    import statistics

    names = ["".join(f"{k}{v}" for k, v in layout.items() if v > 1 or k == "tp") for layout in args.layouts]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name, layout in zip(names, args.layouts, strict=True):
            levels, before, after = run_levels(*_start_server(args, layout), args, args.prefix)
            busy = after.get("tpinfer_pipeline_busy_seconds_total", 0) - before.get(
                "tpinfer_pipeline_busy_seconds_total", 0)
            bubble = after.get("tpinfer_pipeline_bubble_seconds_total", 0) - before.get(
                "tpinfer_pipeline_bubble_seconds_total", 0)
            runs[name].append({"round": round_, "levels": levels, "bubble_share": bubble / busy if busy else None})
            print(f"round {round_} {name}: " + ", ".join(f"{lv['concurrency']} clients {lv['tokens_per_s']:.1f} tok/s"
                                                        for lv in levels), file=sys.stderr, flush=True)
    summary = {"benchmark": "serve_load", "layouts": {}, "max_tokens": args.max_tokens, "rounds": args.rounds,
               "model_path": str(Path(args.model).resolve())}
    print(f"{'layout':>8} {'clients':>7} {'tokens/s':>9} {'vs ' + names[0]:>8} {'TTFT p50':>9} {'tok p50':>8} "
          f"{'bubble':>7}")
    for name in names:
        per_level = []
        for i, c in enumerate(args.concurrency):
            rates = [r["levels"][i]["tokens_per_s"] for r in runs[name]]
            base = [r["levels"][i]["tokens_per_s"] for r in runs[names[0]]]
            shares = [r["bubble_share"] for r in runs[name] if r["bubble_share"] is not None]
            level = {"concurrency": c, "tokens_per_s": statistics.median(rates), "runs": rates,
                     "ratio_to_first": statistics.median(rates) / statistics.median(base),
                     "ttft_p50_ms": statistics.median(r["levels"][i]["ttft_p50_ms"] for r in runs[name]),
                     "per_token_p50_ms": statistics.median(r["levels"][i]["per_token_p50_ms"] for r in runs[name]),
                     "bubble_share": statistics.median(shares) if shares else None}
            per_level.append(level)
            bubble = f"{100 * level['bubble_share']:.0f}%" if level["bubble_share"] is not None else "-"
            print(f"{name:>8} {c:>7} {level['tokens_per_s']:>9.1f} {level['ratio_to_first']:>8.2f} "
                  f"{level['ttft_p50_ms']:>9.1f} {level['per_token_p50_ms']:>8.2f} {bubble:>7}")
        summary["layouts"][name] = per_level
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
