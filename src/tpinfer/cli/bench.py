"""tpinfer bench: measure one layout (or sweep several) on this machine."""

from __future__ import annotations

import argparse
import json
import sys

from tpinfer.cli.common import add_engine_args, add_model_args, model_path, require_causal_lm, resolve_mesh, tp_plan

EPILOG = """examples:
  tpinfer bench --model ./llama-250m --tensor-parallel-size 2 --dtype float32 --batch-size 1 \\
      --input-len 32 --output-len 128 --json
  tpinfer bench --model ./llama-250m --tensor-parallel-size 1,2,4 --plot bench.png

The last line of --json output is one JSON object with decode_tokens_per_s, prefill_tokens_per_s,
load_s, peak_rss_bytes (per rank), param_bytes (per rank), roofline_tokens_per_s and more; a sweep
adds "runs" (one object per TP size) and its top-level keys are those of the last size. With
--quantization SCHEME --accuracy each size also gets "accuracy": greedy_agreement, kl and perplexity
against the float model (see tpinfer verify --quantization)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure load, prefill and decode speed, memory and communication",
        description="Benchmark a checkpoint at one or several tensor-parallel sizes on this machine: load time, "
        "prefill tokens/s and time to first token, decode tokens/s against the memory-bandwidth roofline, peak "
        "RSS and parameter bytes per rank, collectives per step and their share of the time.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(parser, tp=False)
    parser.add_argument("--tensor-parallel-size", "--tp", default=None, dest="tensor_parallel_size", metavar="N[,N...]",
                        help="one size, or a comma-separated sweep such as 1,2,4 (default 1)")
    add_engine_args(parser)
    parser.add_argument("--batch-size", type=int, default=1, metavar="B", help="prompts per batch (default 1)")
    parser.add_argument("--input-len", type=int, default=32, metavar="I", help="prompt tokens (default 32)")
    parser.add_argument("--output-len", type=int, default=128, metavar="O", help="new tokens (default 128)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions; medians reported (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per rank (default: this host's cores / ranks)")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="write the sweep's plot here (default tpinfer-bench.png for a sweep)")
    parser.add_argument("--accuracy", action="store_true",
                        help="with --quantization: also compare the quantized model with its float source at each "
                        "size (greedy agreement over 128 tokens, mean KL, perplexity of the Python Language "
                        "Reference; as tpinfer verify --quantization), reported under \"accuracy\"")
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tpinfer.benchmark import BenchOptions, plot, sweep, table
    from tpinfer.engine.runtime import EngineSpec

    resolve_mesh(args, sweep=True)
    require_causal_lm(model_path(args), "bench")
    if args.data_parallel_size != 1:
        raise ValueError(f"--data-parallel-size {args.data_parallel_size}: tpinfer bench measures one replica; "
                         "replicas serve concurrent requests (benchmarks/serve_load.py --layouts tp1dp2 measures them)")
    sizes = [int(s) for s in str(args.tensor_parallel_size).split(",") if s.strip()]
    if args.accuracy and args.quantization is None:
        raise ValueError("--accuracy compares a model quantized on load (--quantization SCHEME) with its float source; "
                         "give --quantization")
    spec = EngineSpec(
        model=model_path(args),
        pipeline_parallel_size=args.pipeline_parallel_size,
        moe_parallel=args.moe_parallel,
        dtype=args.dtype,
        tp_plan=tp_plan(args.tp_plan),
        quantization=args.quantization,
        quantize_lm_head=args.quantize_lm_head,
        max_model_len=args.max_model_len or args.input_len + args.output_len + 8,
        max_batch_size=args.batch_size,
        all_reduce=args.all_reduce,
        timeout_s=args.timeout,
        threads=args.threads,
    )
    options = BenchOptions(spec, args.batch_size, args.input_len, args.output_len, args.repeat)
    results = sweep(options, sizes)
    print(table(results), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.accuracy:
        from tpinfer import accuracy

        say = lambda m: print(f"tpinfer bench: accuracy: {m}", file=sys.stderr, flush=True)  # noqa: E731
        measured = accuracy.compare_quantized(spec.model, sizes, args.quantization, args.dtype, progress=say,
                                              timeout_s=args.timeout)
        print(accuracy.table(measured), file=sys.stderr if args.json else sys.stdout, flush=True)
        for result, acc in zip(results, measured, strict=True):
            result["accuracy"] = acc.to_json()
    if len(results) > 1 or args.plot:
        path = plot(results, args.plot or "tpinfer-bench.png")
        print(f"plot: {path}", file=sys.stderr)
    if args.json:
        out = dict(results[-1])
        if len(results) > 1:
            out["runs"] = results
        print(json.dumps(out))
    return 0
