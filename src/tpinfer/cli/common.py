"""Arguments several subcommands share."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def add_model_args(parser: argparse.ArgumentParser, tp: bool = True) -> None:
    parser.add_argument("--model", default=None, help="HF checkpoint directory (default: the bundled demo model)")
    if tp:
        parser.add_argument("--tensor-parallel-size", "--tp", type=int, default=1, dest="tensor_parallel_size",
                            metavar="N", help="number of rank processes to shard the model over (default 1)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="weights and compute dtype; auto = the checkpoint's torch_dtype (default auto)")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp-plan", default="auto", metavar="auto|FILE.json",
                        help='"auto" or a JSON file mapping module patterns to colwise/rowwise/replicate')
    parser.add_argument("--quantization", "-q", default=None, metavar="SCHEME",
                        help="quantize the projections while loading, each rank its own slice: int8 (per channel), "
                        "int4 (groups of 32 with offsets; int4-g64, int4-g128, int4-g32-sym), fp8 (e4m3, per "
                        "channel; fp8-tensor); int8 and int4 with -a8 (int4-a8) also round activations to int8 "
                        "for integer dot-product kernels")
    parser.add_argument("--quantize-lm-head", nargs="?", const=True, default=False, metavar="SCHEME",
                        help="quantize the LM head too instead of keeping it float: alone, in the --quantization "
                        "scheme (a GGUF file: its own head blocks); with a SCHEME (e.g. int8), in that one. Fewer "
                        "bytes a decode step, at some accuracy")
    parser.add_argument("--max-model-len", type=int, default=None, metavar="L",
                        help="longest prompt + generation per sequence (default min(2048, the model's))")
    parser.add_argument("--all-reduce", default="auto", choices=("auto", "shm", "gloo"),
                        help="CPU all-reduce: shared memory when every rank is on this host (auto), or force one")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="seconds a collective may wait for another rank before failing (default 120)")


def model_path(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    from tpinfer.assets import demo_model_path

    return demo_model_path()


def tp_plan(value: str) -> str | dict[str, str]:
    if value == "auto":
        return value
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"--tp-plan {value!r} is neither 'auto' nor a JSON file")
    plan = json.loads(path.read_text())
    if not isinstance(plan, dict):
        raise ValueError(f"{value}: a tp plan is a JSON object of module pattern -> strategy")
    return plan


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
