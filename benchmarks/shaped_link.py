"""TP=2 across a slow link against PP=2 across it: two "nodes" in network namespaces joined by a shaped veth pair.

Each "node" is a network namespace with one end of a veth pair (10.77.0.1 and 10.77.0.2) whose egress is shaped
with ``tc qdisc ... tbf`` (default 10 Gbit/s, like Ethernet between servers). This kernel has tbf and htb but no
netem, so no latency is added: the link costs what veth, the TCP stack and the shaper cost (tens of microseconds a
message). Each node runs one torchrun with one rank pinned to its own core (``taskset``); gloo carries every
collective (``--all-reduce gloo``: both namespaces share this host's /dev/shm, which would bypass the link). Two
layouts of the same model across the link:

* TP=2 across the nodes: every layer's two all-reduces cross the link, every token;
* PP=2 across the nodes: one activation (batch x hidden) crosses per step, and the chosen tokens come back.

For each, decode tokens/s and time per token at batch 1 and 8 (lockstep generation: a pipeline's stages take turns),
alternating layouts over ``--rounds``, medians reported; next to them the planner's prediction for the same link
(``tpinfer plan --network-bandwidth ... --network-latency ...``) and a per-node memory bandwidth measured by the
ranks themselves (a float32 GEMV over 256 MiB on both nodes at once). Needs root (``ip netns``, ``tc``); everything
it creates is removed at the end.

    sudo python benchmarks/shaped_link.py --model /path/llama-250m --rate 10gbit --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

NAMESPACES = ("tpi-node0", "tpi-node1")
VETH = ("tpi-veth0", "tpi-veth1")
ADDRESSES = ("10.77.0.1", "10.77.0.2")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def setup_link(rate: str, burst: str) -> None:
    teardown_link()
    for ns in NAMESPACES:
        sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", VETH[0], "type", "veth", "peer", "name", VETH[1])
    for ns, dev, addr in zip(NAMESPACES, VETH, ADDRESSES, strict=True):
        sh("ip", "link", "set", dev, "netns", ns)
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        if rate != "none":
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst",
               burst, "latency", "50ms")


def teardown_link() -> None:
    for ns in NAMESPACES:
        sh("ip", "netns", "del", ns, check=False)


ECHO_SERVER = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("{addr}", 29599)); s.listen(1)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while (data := c.recv(64)):
    c.sendall(data)
"""
ECHO_CLIENT = """
import socket, time
for _ in range(100):
    try:
        c = socket.create_connection(("{addr}", 29599)); break
    except OSError:
        time.sleep(0.05)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
times = []
for _ in range(300):
    t = time.perf_counter(); c.sendall(b"x" * 64); c.recv(64); times.append(time.perf_counter() - t)
print(sorted(times)[len(times) // 2] * 1e6)
"""


def rtt_us() -> float:
    """Median round trip of a 64-byte TCP message between the two namespaces (there is no ping here)."""
    server = subprocess.Popen(["ip", "netns", "exec", NAMESPACES[1], sys.executable, "-c",
                               ECHO_SERVER.format(addr=ADDRESSES[1])])
    try:
        out = sh("ip", "netns", "exec", NAMESPACES[0], sys.executable, "-c", ECHO_CLIENT.format(addr=ADDRESSES[1]))
        return float(out.stdout.strip())
    finally:
        server.kill()
        server.wait()


def run_layout(args: argparse.Namespace, tp: int, pp: int, batch: int, port: int) -> dict:
    """Two torchrun "nodes", one rank each; rank 0's JSON line."""
    script = str(Path(__file__).resolve())
    procs = []
    for node, (ns, dev) in enumerate(zip(NAMESPACES, VETH, strict=True)):
        env = {**os.environ, "GLOO_SOCKET_IFNAME": dev, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        pin = ["taskset", "-c", str(node % os.cpu_count())] if args.pin else []
        cmd = ["ip", "netns", "exec", ns, *pin, sys.executable, "-m",
               "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
               "--master-addr", ADDRESSES[0], "--master-port", str(port), script, "--worker", "--model", args.model,
               "--pp", str(pp), "--batch", str(batch), "--new-tokens", str(args.new_tokens)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"tp={tp} pp={pp} batch={batch} failed:\n{outs[0][1][-3000:]}\n{outs[1][1][-3000:]}")
    line = next(x for x in outs[0][0].splitlines() if x.startswith("{"))
    return json.loads(line)


def worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    import tpinfer
    from tpinfer.engine.sampling import SamplingParams

    model = tpinfer.from_pretrained(args.model, dtype=torch.float32, all_reduce="gloo",
                                    pipeline_parallel_size=args.pp)
    torch.set_num_threads(1)
    engine = model.engine
    # This node's memory bandwidth while the other node reads too: a float32 GEMV over 256 MiB, best of 5.
    matrix, vector = torch.randn(16384, 4096), torch.randn(4096)
    dist.barrier()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        torch.mv(matrix, vector)
        times.append(time.perf_counter() - start)
    bandwidth = matrix.numel() * 4 / min(times) / 1e9
    del matrix
    # What one all-reduce of a decode step's message (1 x hidden float32) costs over this link through gloo.
    message = torch.ones(engine.config.hidden_size)
    samples = []
    for i in range(120):
        start = time.perf_counter()
        dist.all_reduce(message)
        if i >= 20:
            samples.append(time.perf_counter() - start)
    all_reduce_us = statistics.median(samples) * 1e6
    prompts = [[1 + (7 * i + j) % 1000 for j in range(16)] for i in range(args.batch)]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    engine.generator.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True))
    stats = engine.generator.stats
    before = (stats.decode_s, stats.decode_steps)
    engine.generator.generate(prompts, params)
    seconds, steps = stats.decode_s - before[0], stats.decode_steps - before[1]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, bandwidth)
    if engine.ctx.rank == 0:
        print(json.dumps({"tp": engine.ctx.tp_size, "pp": engine.ctx.pp_size, "batch": args.batch,
                          "decode_tokens_per_s": args.batch * steps / seconds, "ms_per_token": 1e3 * seconds / steps,
                          "node_bandwidth_gb_s": gathered, "gloo_all_reduce_us": all_reduce_us}), flush=True)
    model.close()
    return 0


def planner_predictions(model_path: str, bandwidth: float, link_gbs: float, latency_us: float,
                        batches: list[int]) -> dict:
    from tpinfer.planner import build_request, load_model, make_plan
    from tpinfer.planner.report_json import to_json

    model = load_model(model_path)
    out = {}
    for batch in batches:
        request = build_request(model, gpu="cpu", memory_bandwidth=bandwidth, gpus_per_node=1, nodes=2,
                                network="ethernet", network_bandwidth=link_gbs, network_latency=latency_us,
                                dtype="fp32", batch_size=batch)
        for layout in to_json(make_plan(model, request))["layouts"]:
            key = (layout["tp"], layout["pp"], layout["dp"])
            if key in ((2, 1, 1), (1, 2, 1)):
                step = layout["decode"]["short_context"]
                out[f"tp{key[0]}pp{key[1]}-b{batch}"] = {"ms_per_token": 1e3 * step["step_s"],
                                                          "decode_tokens_per_s": step["tokens_per_s"],
                                                          "comm_share": step["comm_share"]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rate", default="10gbit", help="tbf rate of each direction, or none (default 10gbit)")
    parser.add_argument("--burst", default="256kb", help="tbf burst (default 256kb)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=False,
                        help="pin each node to its own core with taskset (default off: gloo's I/O threads then "
                        "share the cores instead of waiting behind the compute thread)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    batches = [int(b) for b in args.batches.split(",")]
    setup_link(args.rate, args.burst)
    runs: dict[str, list[dict]] = {}
    try:
        rtt = rtt_us()
        port = 29611
        for round_ in range(args.rounds):
            for batch in batches:
                for tp, pp in ((2, 1), (1, 2)):
                    port += 1
                    result = run_layout(args, tp, pp, batch, port)
                    runs.setdefault(f"tp{tp}pp{pp}-b{batch}", []).append(result)
                    print(f"round {round_}: tp={tp} pp={pp} batch {batch}: {result['decode_tokens_per_s']:.1f} tok/s, "
                          f"{result['ms_per_token']:.1f} ms/token", file=sys.stderr, flush=True)
    finally:
        teardown_link()
    bandwidth = statistics.median(b for rs in runs.values() for r in rs for b in r["node_bandwidth_gb_s"])
    link_gbs = _rate_gbs(args.rate)
    latency = rtt / 2
    all_reduce_us = statistics.median(r["gloo_all_reduce_us"] for rs in runs.values() for r in rs)
    nominal = planner_predictions(args.model, bandwidth, link_gbs or 12.5, latency, batches)
    # Calibrated: the planner's per-message latency set to what gloo's all-reduce of one message costs here (its two
    # ring steps at two ranks included), the rest of the planner's model unchanged.
    calibrated = planner_predictions(args.model, bandwidth, link_gbs or 12.5, all_reduce_us, batches)
    print(f"link: veth, tbf {args.rate} each way, no added latency (TCP round trip {rtt:.0f} us); gloo all-reduce "
          f"of 1 x hidden float32 across it {all_reduce_us:.0f} us; per-node bandwidth {bandwidth:.1f} GB/s (measured)")
    print(f"{'layout':>8} {'batch':>5} {'tok/s':>8} {'ms/token':>9}   planner ms/token: {'nominal':>8} "
          f"{'calibrated':>10}")
    summary = {"benchmark": "shaped_link", "rate": args.rate, "rtt_us": rtt, "node_bandwidth_gb_s": bandwidth,
               "gloo_all_reduce_us": all_reduce_us, "planner_link_gb_s": link_gbs,
               "planner_latency_us": {"nominal": latency, "calibrated": all_reduce_us}, "results": {}}
    nan = float("nan")
    for key, results in runs.items():
        tps = statistics.median(r["decode_tokens_per_s"] for r in results)
        ms = statistics.median(r["ms_per_token"] for r in results)
        layout, batch = key.split("-b")
        print(f"{layout:>8} {batch:>5} {tps:>8.1f} {ms:>9.1f}   {'':>17} "
              f"{nominal.get(key, {}).get('ms_per_token', nan):>8.1f} "
              f"{calibrated.get(key, {}).get('ms_per_token', nan):>10.1f}")
        summary["results"][key] = {"decode_tokens_per_s": tps, "ms_per_token": ms, "runs": results,
                                   "planner": {"nominal": nominal.get(key), "calibrated": calibrated.get(key)}}
    print(json.dumps(summary))
    return 0


def _rate_gbs(rate: str) -> float | None:
    """tc's rate ("10gbit", "500mbit") in GB/s."""
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale / 8 / 1e9
    return None


if __name__ == "__main__":
    sys.exit(main())
