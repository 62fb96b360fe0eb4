"""tpinfer generate: start the ranks, generate for each prompt, print rank 0's result."""

from __future__ import annotations

import argparse
import json
import sys
import time

from tpinfer.cli.common import (
    add_engine_args,
    add_model_args,
    human_bytes,
    model_path,
    require_causal_lm,
    resolve_mesh,
    tp_plan,
)
from tpinfer.parallel.mesh import split_layers

EPILOG = """examples:
  tpinfer generate --tensor-parallel-size 2 "The function returns"
  tpinfer generate --model ./my-llama --tp 4 --dtype float32 --max-new-tokens 32 --temperature 0 \\
      --ignore-eos --json "Hello" "Tensor parallelism is"

  tpinfer generate --model ./SmolLM2-135M-Instruct --tp 3 --chat --system "Answer briefly." \
      "What is the capital of France?"

With --json, stdout has exactly one JSON object per prompt:
  {"prompt", "prompt_token_ids", "token_ids", "text", "logprobs"}
Logs, progress and the layout summary go to stderr.

Sampling options left out take the checkpoint's generation_config.json defaults (temperature, top_p, top_k,
max_new_tokens), else greedy decoding of up to 64 tokens, cut to the room the context leaves. Generation stops
at any end-of-sequence id that file (or config.json) lists, unless --ignore-eos."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from prompts across N rank processes",
        description="Load a checkpoint sharded over --tensor-parallel-size processes (started here) and "
        "generate a completion for each PROMPT.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(parser)
    add_engine_args(parser)
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="K",
                        help="tokens to generate (default: generation_config.json's, else 64, within the context)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy (default: generation_config.json's, else 0)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default 1 = off)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest (default 0 = off)")
    parser.add_argument("--chat", action="store_true",
                        help="treat each PROMPT as a user message and render it with the model's chat template")
    parser.add_argument("--system", default=None, metavar="TEXT", help="with --chat: a system message first")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (same tokens every run)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")
    parser.add_argument("prompts", nargs="+", metavar="PROMPT")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tpinfer.api import LLM

    if args.system is not None and not args.chat:
        raise ValueError("--system needs --chat")
    resolve_mesh(args)
    require_causal_lm(model_path(args), "generate")
    if args.data_parallel_size != 1:
        raise ValueError(f"--data-parallel-size {args.data_parallel_size}: replicas serve concurrent requests; "
                         "tpinfer generate runs one batch on one replica (use tpinfer serve, or dp=1)")
    llm = LLM(
        model_path(args),
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        moe_parallel=args.moe_parallel,
        dtype=args.dtype,
        tp_plan=tp_plan(args.tp_plan),
        quantization=args.quantization,
        quantize_lm_head=args.quantize_lm_head,
        max_model_len=args.max_model_len,
        max_batch_size=max(8, len(args.prompts)),
        all_reduce=args.all_reduce,
        timeout_s=args.timeout,
    )
    try:
        if args.chat:
            system = [{"role": "system", "content": args.system}] if args.system is not None else []
            prompts = [llm.encode_chat([*system, {"role": "user", "content": p}]) for p in args.prompts]
        else:
            prompts = [llm.encode(p) for p in args.prompts]
        params = llm.sampling_params(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                     longest_prompt=max(len(p) for p in prompts), seed=args.seed,
                                     ignore_eos=args.ignore_eos)
        note = llm.defaults.describe()
        if note:
            print(f"tpinfer: {note}", file=sys.stderr, flush=True)
        comm = llm.engine.ctx.comm
        comm.stats.reset()
        gen_stats = llm.engine.generator.stats
        steps_before = gen_stats.decode_steps
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        forwards = 1 + gen_stats.decode_steps - steps_before
        for text, out in zip(args.prompts, outputs, strict=True):
            out.prompt = text
            if args.json:
                print(json.dumps(out.to_json()), flush=True)
            elif args.chat:
                print(f"> {text}\n{out.text}\n", flush=True)
            else:
                print(f"{out.prompt}{out.text}\n", flush=True)
        generated = sum(len(o.token_ids) for o in outputs)
        print_layout(llm, comm.stats.calls, forwards, generated, elapsed)
    finally:
        llm.close()
    return 0


def print_layout(llm, calls: dict[str, int], forwards: int, generated: int, elapsed: float) -> None:
    """One short block on stderr: what tensor (and pipeline) parallelism did, as rank 0 saw it."""
    engine, config = llm.engine, llm.config
    ctx = engine.ctx
    tp, pp = ctx.tp_size, ctx.pp_size
    element = next(engine.model.parameters()).element_size()
    whole_params = config.num_parameters
    layers = config.num_hidden_layers
    held = engine.model.model.layers.indices
    per_step = {kind: n / forwards for kind, n in calls.items()} if tp > 1 else {}
    all_reduce = per_step.get("all_reduce", 0.0)
    title = f"tp={tp}" if pp == 1 else f"tp={tp} x pp={pp} (rank 0: stage 0, layers {held[0]}-{held[-1]})"
    stage = f"{len(held)} layers" if pp > 1 else f"{layers} layers"
    lines = [
        f"--- tensor parallelism: {title}, {config.model_type}, {layers} layers ---",
        f"per rank : {engine.param_count:,} parameters, {human_bytes(engine.param_bytes)}"
        f"  (whole model {whole_params:,}, {human_bytes(whole_params * element)};"
        f" {100 * engine.param_count / whole_params:.0f}% on rank 0)",
        f"per step : {all_reduce:.0f} all-reduces = 2 x {stage} + 1 embedding"
        f", {per_step.get('all_gather', 0):.0f} all-gather (sampling candidates, or logits for top-p)" if tp > 1 else "per step : no collectives (tp=1)",
        f"speed    : {generated} tokens in {elapsed:.2f}s = {generated / elapsed:.1f} tokens/s (prefill included)",
    ]
    if pp > 1 and ctx.pipe is not None:
        sent = ctx.pipe.stats.bytes.get("pipe_send", 0)
        lines.insert(3, f"pipeline : {pp} stages of {', '.join(map(str, split_layers(layers, pp)))} layers; rank 0 "
                        f"sent {human_bytes(sent)} of activations to stage 1")
    print("\n".join(lines), file=sys.stderr, flush=True)
