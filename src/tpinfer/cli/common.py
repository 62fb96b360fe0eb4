"""Arguments several subcommands share."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def add_model_args(parser: argparse.ArgumentParser, tp: bool = True) -> None:
    parser.add_argument("--model", default=None, help="HF checkpoint directory (default: the bundled demo model)")
    if tp:
        parser.add_argument("--tensor-parallel-size", "--tp", type=int, default=None, dest="tensor_parallel_size",
                            metavar="N", help="ranks each layer is sharded over (default 1)")
    add_mesh_args(parser)
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="weights and compute dtype; auto = the checkpoint's torch_dtype (default auto)")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp-plan", default="auto", metavar="auto|auto-sp|FILE.json",
                        help='"auto", "auto-sp" (with sequence parallelism) or a JSON file mapping module patterns '
                        "to colwise/rowwise/replicate")
    parser.add_argument("--quantization", "-q", default=None, metavar="SCHEME",
                        help="quantize the projections while loading, each rank its own slice: int8 (per channel), "
                        "int4 (groups of 32 with offsets; int4-g64, int4-g128, int4-g32-sym), fp8 (e4m3, per "
                        "channel; fp8-tensor); int8 and int4 with -a8 (int4-a8) also round activations to int8 "
                        "for integer dot-product kernels")
    parser.add_argument("--quantize-lm-head", nargs="?", const=True, default=False, metavar="SCHEME",
                        help="quantize the LM head too instead of keeping it float: alone, in the --quantization "
                        "scheme (a GGUF file: its own head blocks); with a SCHEME (e.g. int8), in that one. Fewer "
                        "bytes a decode step, at some accuracy")
    parser.add_argument("--moe-parallel", default="tensor", choices=("tensor", "expert"),
                        help="mixture-of-experts models: split every expert over the TP ranks (tensor) or give each "
                        "rank whole experts (expert); default tensor")
    parser.add_argument("--max-model-len", type=int, default=None, metavar="L",
                        help="longest prompt + generation per sequence (default min(2048, the model's))")
    parser.add_argument("--all-reduce", default="auto", choices=("auto", "shm", "gloo"),
                        help="CPU all-reduce: shared memory when every rank is on this host (auto), or force one")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="seconds a collective may wait for another rank before failing (default 120)")


def add_mesh_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline-parallel-size", "--pp", type=int, default=None, dest="pipeline_parallel_size",
                        metavar="P", help="pipeline stages, each holding a contiguous run of layers (default 1)")
    parser.add_argument("--data-parallel-size", "--dp", type=int, default=None, dest="data_parallel_size",
                        metavar="D", help="model replicas, each of tp x pp ranks (default 1)")
    parser.add_argument("--layout", default=None, metavar="PLAN.json",
                        help="take tp, pp and dp from this file: `tpinfer plan --json` output (its \"recommended\" "
                        "layout) or an object with \"tp\", \"pp\" and \"dp\"; flags given as well must agree")


MESH_FLAGS = {"tensor_parallel_size": ("tp", "--tensor-parallel-size"),
              "pipeline_parallel_size": ("pp", "--pipeline-parallel-size"),
              "data_parallel_size": ("dp", "--data-parallel-size")}


def read_layout(path: str) -> dict[str, int]:
    """{"tp", "pp", "dp"} from a ``tpinfer plan --json`` file (its recommended layout) or a plain layout object."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--layout {path}: no such file")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--layout {path}: not JSON ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("recommended"), dict):
        data = data["recommended"]
    if not isinstance(data, dict) or not any(key in data for key in ("tp", "pp", "dp")):
        raise ValueError(f"--layout {path}: expected `tpinfer plan --json` output or an object with tp, pp and dp")
    out = {}
    for key in ("tp", "pp", "dp"):
        value = data.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"--layout {path}: {key} must be a positive integer, got {value!r}")
        out[key] = value
    return out


def resolve_mesh(args: argparse.Namespace, sweep: bool = False) -> None:
    """Fill the three mesh sizes in ``args`` from their flags and ``--layout`` (default 1 each); a flag that
    disagrees with the layout file is an error. With ``sweep`` the TP flag may be a list (bench), left as given."""
    layout = read_layout(args.layout) if getattr(args, "layout", None) else {}
    for dest, (key, flag) in MESH_FLAGS.items():
        given = getattr(args, dest, None)
        if key in layout:
            if given is not None and str(given) != str(layout[key]):
                raise ValueError(f"{flag} {given} disagrees with --layout {args.layout} ({key}={layout[key]})")
            setattr(args, dest, layout[key] if not (sweep and dest == "tensor_parallel_size") else str(layout[key]))
        elif given is None:
            setattr(args, dest, "1" if sweep and dest == "tensor_parallel_size" else 1)


def model_path(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    from tpinfer.assets import demo_model_path

    return demo_model_path()


def require_causal_lm(path: str, command: str) -> None:
    """Refuse an encoder checkpoint before any process starts: it embeds, it does not generate."""
    from tpinfer.config import ModelConfig
    from tpinfer.models.family import CAUSAL_LM

    config = ModelConfig.from_pretrained(path)
    if config.family.kind != CAUSAL_LM:
        raise ValueError(f"{path} is an encoder ({config.model_type}), which has no LM head: tpinfer {command} runs "
                         "causal LMs; embed with tpinfer embed (or tpinfer serve, for /v1/embeddings)")


def tp_plan(value: str) -> str | dict[str, str]:
    if value in ("auto", "auto-sp"):  # tpinfer.parallel.plan's AUTO and AUTO_SP (not imported: no torch here)
        return value
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"--tp-plan {value!r} is neither 'auto', 'auto-sp' nor a JSON file")
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
