"""``tpinfer check``: the seeds' key-constraints checklist for a model and a launch, each line pass/fail/unknown."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from dataclasses import dataclass

from tpinfer.cli.common import add_mesh_args, resolve_mesh

DESCRIPTION = """\
Check a model and a launch against the tensor-parallel constraints before starting it: TP <= attention
heads, heads, KV heads and FFN divisible by TP, TP within one node's GPUs, the GPUs of a TP group
connected by NVLink (read from `nvidia-smi topo -m` when it exists; otherwise "unknown: cannot tell"),
and the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
present and consistent. Exit status 0 when nothing fails, 1 when something does."""

EPILOG = """\
examples:
  tpinfer check --model llama-3-70b --tensor-parallel-size 8 --gpus-per-node 8
  tpinfer check --model path/to/checkpoint --tensor-parallel-size 2 --json
  torchrun --nproc-per-node 4 -m tpinfer.cli.main check --model llama-3-8b --tensor-parallel-size 4"""

NVIDIA_SMI_TIMEOUT_S = 10


@dataclass(frozen=True)
class CheckArgs:
    model: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    gpus_per_node: int | None
    nnodes: int | None
    json: bool


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check",
        help="check a model and a launch against the tensor-parallel constraints",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="directory with config.json, or a catalogue name")
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=None, metavar="N",
                   help="TP size to check (or take it from --layout)")
    add_mesh_args(p)
    p.add_argument("--gpus-per-node", type=int, metavar="N", help="GPUs per node (default: what nvidia-smi lists)")
    p.add_argument("--nnodes", type=int, metavar="K", help="number of nodes (checked against torchrun's variables)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.set_defaults(func=run)


def nvidia_smi(*args: str) -> tuple[str | None, str]:
    """stdout of ``nvidia-smi ARGS``, or None and why it could not be read."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, "nvidia-smi not found"
    try:
        done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"nvidia-smi {' '.join(args)} failed: {exc}"
    if done.returncode != 0:
        return None, f"nvidia-smi {' '.join(args)} exited with {done.returncode}: {done.stderr.strip()[:200]}"
    return done.stdout, ""


def visible_gpu_count() -> int | None:
    listing, _ = nvidia_smi("-L")
    if listing is None:
        return None
    count = sum(1 for line in listing.splitlines() if line.startswith("GPU "))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip()]))
    return count


def run(args: argparse.Namespace) -> int:
    from tpinfer.planner import load_model
    from tpinfer.planner.checks import FAIL, run_checks

    if args.tensor_parallel_size is None and not args.layout:
        raise ValueError("give --tensor-parallel-size (and optionally --pipeline-parallel-size, "
                         "--data-parallel-size) or --layout plan.json")
    resolve_mesh(args)
    a = CheckArgs(args.model, args.tensor_parallel_size, args.pipeline_parallel_size, args.data_parallel_size,
                  args.gpus_per_node, args.nnodes, args.json)
    model = load_model(a.model)
    topology, why = nvidia_smi("topo", "-m")
    checks = run_checks(
        model, a.tensor_parallel_size, a.gpus_per_node, a.nnodes, dict(os.environ), topology, visible_gpu_count(), why,
        a.pipeline_parallel_size, a.data_parallel_size,
    )
    failed = any(c.status == FAIL for c in checks)
    if a.json:
        print(json.dumps({"ok": not failed, "checks": [c.__dict__ for c in checks]}))
    else:
        width = max(len(c.name) for c in checks)
        mesh = "" if (a.pipeline_parallel_size, a.data_parallel_size) == (1, 1) else (
            f" x pp={a.pipeline_parallel_size} x dp={a.data_parallel_size}")
        print(f"tpinfer check: {model.name} at tp={a.tensor_parallel_size}{mesh}")
        for c in checks:
            print(f"  {c.status.upper():7}  {c.name.ljust(width)}  {c.detail}")
        print("result: " + ("FAIL" if failed else "ok (no check failed)"))
    return 1 if failed else 0
