"""tpinfer serve: an OpenAI-compatible HTTP server over N tensor-parallel rank processes."""

from __future__ import annotations

import argparse
import os

from tpinfer.cli.common import add_engine_args, add_model_args, model_path, resolve_mesh, tp_plan

API_KEY_ENV = "TPINFER_API_KEY"

EPILOG = f"""examples:
  tpinfer serve --model ./my-llama --tensor-parallel-size 2 --dtype bfloat16 --port 8000
  {API_KEY_ENV}=secret tpinfer serve --tp 4 --max-num-seqs 32 --max-model-len 1024 --served-model-name demo

then, with any OpenAI client:
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{{"model": "demo", "prompt": "The function returns", "max_tokens": 32, "temperature": 0}}'
  python -c 'import openai; c = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret"); \\
      print(c.completions.create(model="demo", prompt="Hello", max_tokens=16).choices[0].text)'

Routes: POST /v1/completions, POST /v1/chat/completions (stream: true for server-sent events),
GET /v1/models, GET /health (503 while draining or after a failure), GET /metrics (Prometheus).
KV-cache memory is fixed at start: --max-num-seqs slots of --max-model-len tokens on every rank.
Requests beyond the slots wait in a queue of --max-queue sequences; beyond that they get 503 at once.
SIGTERM or Ctrl-C drains: new requests get 503, open ones get --shutdown-timeout seconds, then exit 0.
If a rank dies, open requests fail, /health turns 503, every rank is stopped and the exit code is 1.
Run it under torchrun instead (torchrun --nproc-per-node N -m tpinfer.cli.main serve ...) and it
joins torchrun's ranks rather than starting its own."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve an OpenAI-compatible API (completions, chat, streaming) across N rank processes",
        description="Load a checkpoint sharded over --tensor-parallel-size processes (started here) and serve "
        "the OpenAI completions and chat API with continuous batching.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(parser)
    add_engine_args(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--max-num-seqs", type=int, default=16, metavar="S",
                        help="KV-cache slots, the most sequences generating at once (default 16)")
    parser.add_argument("--max-queue", type=int, default=64, metavar="Q",
                        help="sequences that may wait for a slot; beyond that requests get 503 (default 64)")
    # The default is scheduler.MAX_NUM_BATCHED_TOKENS (a test checks), not imported: the CLI loads without torch.
    parser.add_argument("--max-num-batched-tokens", type=int, default=128, metavar="T",
                        help="prompt tokens prefilled per step: arrivals are packed and long prompts chunked to it, "
                        "between the running sequences' decodes (default %(default)s; larger: more prefill "
                        "throughput, later first tokens for the rest of a burst)")
    parser.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="start a prompt from the cached keys and values of a shared prefix (a system prompt) "
                        "another sequence computed (default on; off for models whose cache cannot be shared)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV} if set)")
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="the model name clients send (default: the checkpoint folder's name; the path "
                        "given to --model is accepted too)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                        help="on SIGTERM/SIGINT, seconds open requests may take to finish (default 30)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="B",
                        help="largest accepted request body (default 1 MiB)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tpinfer.serve.server import ServeConfig, serve

    resolve_mesh(args)
    config = ServeConfig(
        model=model_path(args),
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size,
        moe_parallel=args.moe_parallel,
        dtype=args.dtype,
        tp_plan=tp_plan(args.tp_plan),
        quantization=args.quantization,
        quantize_lm_head=args.quantize_lm_head,
        max_model_len=args.max_model_len,
        all_reduce=args.all_reduce,
        timeout_s=args.timeout,
        host=args.host,
        port=args.port,
        max_num_seqs=args.max_num_seqs,
        max_queue=args.max_queue,
        max_num_batched_tokens=args.max_num_batched_tokens,
        prefix_caching=args.prefix_caching,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        served_model_name=args.served_model_name,
        shutdown_timeout_s=args.shutdown_timeout,
        max_body_bytes=args.max_body_bytes,
    )
    return serve(config)
