"""tpinfer verify: the same prompts at every tensor-parallel size (and through HF), compared with TP=1."""

from __future__ import annotations

import argparse
import json
import sys

from tpinfer.cli.common import model_path, require_causal_lm

EPILOG = """examples:
  tpinfer verify --model ./my-checkpoint --tensor-parallel-size 1,2,4
  tpinfer verify --model ./my-checkpoint --tp 2,4 --reference hf --json

Per size: greedy_agreement (share of greedy tokens equal to TP=1's), max_logit_diff (largest |logit difference|
on the TP=1 continuation, teacher-forced) and kl (mean KL(TP=1 || size) in nats); with --reference hf the same
against HF transformers' own model on the same weights. --json ends with one JSON object:
  {"model", "dtype", "sizes": [{"tp", "greedy_agreement", "max_logit_diff", "kl", "passed", "divergences",
   "divergences_at_ties", "hf": {...}}], "passed"}
Greedy tokens pass when they agree, or when every place they first part is a near-tie (the reference's logits
of the two tokens within the logit tolerance), which rounding may decide either way.
Exit status 0 when every size passes, 1 otherwise."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check that every TP size (and HF transformers) gives TP=1's tokens and logits",
        description="Run the same prompts at each tensor-parallel size and compare greedy tokens, logits and KL "
        "divergence with TP=1 (and, with --reference hf, with HF transformers on the same weights).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="HF checkpoint directory (default: the bundled demo model)")
    parser.add_argument("--tensor-parallel-size", "--tp", default="1,2", dest="tensor_parallel_size",
                        metavar="N[,N...]", help="sizes to check (default 1,2); TP=1 always runs as the reference")
    parser.add_argument("--reference", choices=("hf",), default=None,
                        help="also compare with HF transformers' model on the same weights")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="weights and compute dtype (default float32)")
    parser.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                        help="a prompt (repeatable; default three built-in ones)")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="K",
                        help="greedy tokens per prompt (default 16; 128 with --quantization)")
    parser.add_argument("--min-agreement", type=float, default=1.0, metavar="F",
                        help="share of greedy tokens that must match (default 1.0)")
    parser.add_argument("--max-logit-diff", type=float, default=None, metavar="D",
                        help="largest logit difference that passes (default per dtype: float32 2e-3)")
    parser.add_argument("--max-kl", type=float, default=None, metavar="K",
                        help="largest mean KL divergence that passes (default per dtype: float32 1e-6)")
    parser.add_argument("--quantization", "-q", default=None, metavar="SCHEME",
                        help="instead: compare the model quantized on load (int8, int4, fp8, ...) with its float self "
                        "at each size: greedy agreement over --max-new-tokens (default 128 here), mean KL, and "
                        "perplexity of the Python Language Reference (20,000+ tokens)")
    parser.add_argument("--window", type=int, default=512, metavar="T",
                        help="with --quantization: tokens per perplexity window (default 512)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="seconds a collective may wait for another rank (default 120)")
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tpinfer.verify import table, tolerances, verify

    sizes = [int(s) for s in str(args.tensor_parallel_size).split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--tensor-parallel-size needs sizes of at least 1, got {args.tensor_parallel_size!r}")
    path = model_path(args)
    require_causal_lm(path, "verify")
    say = lambda m: print(f"tpinfer verify: {m}", file=sys.stderr, flush=True)  # noqa: E731
    if args.quantization is not None:
        return _quantized(args, path, sizes, say)
    results = verify(path, sizes, args.dtype, args.prompt, args.max_new_tokens or 16, args.reference,
                     args.min_agreement,
                     args.max_logit_diff, args.max_kl, progress=say, timeout_s=args.timeout)
    logit_tol, kl_tol = tolerances(args.dtype, args.max_logit_diff, args.max_kl)
    print(table(results, args.dtype, logit_tol, kl_tol), file=sys.stderr if args.json else sys.stdout, flush=True)
    passed = all(r.passed for r in results)
    if args.json:
        print(json.dumps({"model": path, "dtype": args.dtype, "reference": args.reference,
                          "tolerances": {"max_logit_diff": logit_tol, "kl": kl_tol, "min_agreement": args.min_agreement},
                          "sizes": [r.to_json() for r in results], "passed": passed}))
    return 0 if passed else 1


def _quantized(args: argparse.Namespace, path: str, sizes: list[int], say) -> int:  # noqa: ANN001
    from tpinfer.accuracy import compare_quantized, table

    if args.reference is not None:
        raise ValueError("--quantization compares with the float model; --reference hf does not apply")
    results = compare_quantized(path, sizes, args.quantization, args.dtype, args.prompt, args.max_new_tokens or 128,
                                args.window, progress=say, timeout_s=args.timeout)
    print(table(results), file=sys.stderr if args.json else sys.stdout, flush=True)
    passed = all(r.passed for r in results)
    if args.json:
        print(json.dumps({"model": path, "dtype": args.dtype, "reference": "float",
                          "sizes": [r.to_json() for r in results], "passed": passed}))
    return 0 if passed else 1

