"""``tpinfer plan``: memory, fit, communication and layout advice for a model on a cluster, before renting it."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

DESCRIPTION = """\
Plan a deployment before renting GPUs: from the model's config.json (or a catalogue name) and a description
of the cluster, print the parameter count and weight bytes, every tensor-parallel size with why it is valid
or not, per-GPU memory (weights, KV cache, workspace, overhead) for every TP x PP x DP layout, the
communication per generated token and its share of a decode step, a memory-bandwidth ceiling on tokens/s,
and a recommended layout with the reasoning. Pure arithmetic: no GPU, no weights, no torch.distributed."""

EPILOG = """\
examples:
  tpinfer plan --model llama-3-70b --gpu h100-80gb --gpus-per-node 8 --max-model-len 8192
  tpinfer plan --model llama-3-70b --gpu h100-80gb --gpus-per-node 8 --objective throughput --json
  tpinfer plan --model llama-3.1-405b --gpu h100-80gb --gpus-per-node 8 --nodes 2
  tpinfer plan --model path/to/checkpoint --gpu cpu --memory-bandwidth 20 --gpus-per-node 2
  tpinfer plan --model unknown   # lists the catalogue"""


@dataclass(frozen=True)
class PlanArgs:
    model: str
    gpu: str | None
    gpu_memory: float | None
    memory_bandwidth: float | None
    gpus_per_node: int | None
    nodes: int
    interconnect: str | None
    network: str
    network_bandwidth: float | None
    network_latency: float | None
    dtype: str
    max_model_len: int | None
    batch_size: int
    objective: str
    json: bool


def register(subparsers: argparse._SubParsersAction) -> None:
    from tpinfer.planner.dtypes import DTYPES
    from tpinfer.planner.hardware import GPUS, LINKS

    p = subparsers.add_parser(
        "plan",
        help="memory, fit, communication and layout advice for a model on a cluster",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="directory with config.json, or a catalogue name (e.g. llama-3-70b)")
    p.add_argument("--gpu", help=f"device: {', '.join(GPUS)}, or cpu (host memory); default h100-80gb")
    p.add_argument(
        "--gpu-memory", type=float, metavar="GiB", help="memory per device, GiB (a custom device, or override)"
    )
    p.add_argument(
        "--memory-bandwidth", type=float, metavar="GB/s", help="memory bandwidth per device (per host for cpu)"
    )
    p.add_argument("--gpus-per-node", type=int, metavar="N", help="devices (ranks) per node; default 8, 1 for cpu")
    p.add_argument("--nodes", type=int, default=1, metavar="K", help="number of nodes (default 1)")
    p.add_argument(
        "--interconnect", choices=sorted(LINKS), help="link between devices of a node; default: the device's"
    )
    p.add_argument(
        "--network", choices=sorted(LINKS), default="infiniband", help="link between nodes (default infiniband)"
    )
    p.add_argument("--network-bandwidth", type=float, metavar="GB/s",
                   help="override the network's bandwidth per direction (e.g. 1.25 for 10 Gb/s Ethernet)")
    p.add_argument("--network-latency", type=float, metavar="US", help="override the network's cost of a message, us")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="weight dtype (default bf16)")
    p.add_argument(
        "--max-model-len", type=int, metavar="L", help="tokens of context per sequence; default: the model's"
    )
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="sequences decoded together per replica")
    p.add_argument("--objective", choices=["latency", "throughput"], default="latency", help="what to optimise")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=run)


def parse(args: argparse.Namespace) -> PlanArgs:
    return PlanArgs(
        model=args.model,
        gpu=args.gpu,
        gpu_memory=args.gpu_memory,
        memory_bandwidth=args.memory_bandwidth,
        gpus_per_node=args.gpus_per_node,
        nodes=args.nodes,
        interconnect=args.interconnect,
        network=args.network,
        network_bandwidth=args.network_bandwidth,
        network_latency=args.network_latency,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        batch_size=args.batch_size,
        objective=args.objective,
        json=args.json,
    )


def run(args: argparse.Namespace) -> int:
    from tpinfer.planner import build_request, load_model, make_plan
    from tpinfer.planner.report import to_text
    from tpinfer.planner.report_json import to_json

    a = parse(args)
    model = load_model(a.model)
    request = build_request(
        model,
        gpu=a.gpu,
        gpu_memory=a.gpu_memory,
        memory_bandwidth=a.memory_bandwidth,
        gpus_per_node=a.gpus_per_node,
        nodes=a.nodes,
        interconnect=a.interconnect,
        network=a.network,
        network_bandwidth=a.network_bandwidth,
        network_latency=a.network_latency,
        dtype=a.dtype,
        max_model_len=a.max_model_len,
        batch_size=a.batch_size,
        objective=a.objective,
    )
    plan = make_plan(model, request)
    print(json.dumps(to_json(plan)) if a.json else to_text(plan))
    return 0
