"""tpinfer embed: start the ranks, run an encoder over each text, print rank 0's sentence embeddings."""

from __future__ import annotations

import argparse
import json
import sys
import time

from tpinfer.cli.common import DTYPE_CHOICES, human_bytes, tp_plan

EPILOG = """examples:
  tpinfer embed --model ./all-MiniLM-L6-v2 --tensor-parallel-size 2 "A cat sat on the mat." "Tensors split."
  tpinfer embed --model ./all-MiniLM-L6-v2 --tp 3 --json --truncate "$(cat long.txt)"

With --json, stdout has exactly one JSON object per text:
  {"text", "token_ids", "embedding"}
Logs and the layout summary go to stderr.

Embeddings are pooled as the checkpoint's sentence-transformers files say (modules.json, 1_Pooling/config.json,
2_Normalize); without them, mean pooling without normalisation (said on stderr). A text longer than
max_seq_length (sentence_bert_config.json; --max-model-len overrides) is an error unless --truncate."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="sentence embeddings from an encoder (BERT) across N rank processes",
        description="Load an encoder checkpoint sharded over --tensor-parallel-size processes (started here) and "
        "print the sentence embedding of each TEXT.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="encoder checkpoint directory (a sentence-transformers model)")
    parser.add_argument("--tensor-parallel-size", "--tp", type=int, default=1, dest="tensor_parallel_size",
                        metavar="N", help="ranks each layer is sharded over (default 1)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="weights and compute dtype; auto = the checkpoint's torch_dtype (default auto)")
    parser.add_argument("--tp-plan", default="auto", metavar="auto|FILE.json",
                        help='"auto" or a JSON file mapping module patterns to colwise/rowwise/replicate/vocab')
    parser.add_argument("--max-model-len", type=int, default=None, metavar="L",
                        help="longest input in tokens (default: max_seq_length, else max_position_embeddings)")
    parser.add_argument("--truncate", action="store_true",
                        help="cut texts longer than the limit to it (HF's truncation) instead of failing")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B",
                        help="texts per forward, longest first (default 32)")
    parser.add_argument("--all-reduce", default="auto", choices=("auto", "shm", "gloo"),
                        help="CPU all-reduce: shared memory when every rank is on this host (auto), or force one")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="seconds a collective may wait for another rank before failing (default 120)")
    parser.add_argument("--json", action="store_true", help="one JSON object per text on stdout")
    parser.add_argument("texts", nargs="+", metavar="TEXT")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tpinfer.api import LLM
    from tpinfer.config import ModelConfig
    from tpinfer.models.family import ENCODER

    config = ModelConfig.from_pretrained(args.model)
    if config.family.kind != ENCODER:  # before any process starts
        raise ValueError(f"{args.model} is a causal LM ({config.model_type}), not an encoder: tpinfer embed runs "
                         "encoder models (bert); use tpinfer generate")
    llm = LLM(args.model, tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
              tp_plan=tp_plan(args.tp_plan), max_model_len=args.max_model_len, max_batch_size=args.batch_size,
              all_reduce=args.all_reduce, timeout_s=args.timeout)
    try:
        print(f"tpinfer: {llm.pooling.describe()}", file=sys.stderr, flush=True)
        comm = llm.engine.ctx.comm
        comm.stats.reset()
        stats = llm.engine.encoder.stats
        forwards_before = stats.forwards
        start = time.perf_counter()
        outputs = llm.embed(args.texts, truncate=args.truncate)
        elapsed = time.perf_counter() - start
        for out in outputs:
            if args.json:
                print(json.dumps(out.to_json()), flush=True)
            else:
                head = ", ".join(f"{v:.4f}" for v in out.embedding[:4])
                print(f"{out.text!r}: {len(out.token_ids)} tokens -> {len(out.embedding)} dims [{head}, ...]",
                      flush=True)
        cut = sum(out.truncated for out in outputs)
        if cut:
            print(f"tpinfer: {cut} of {len(outputs)} texts truncated to {llm.max_model_len} tokens", file=sys.stderr)
        print_layout(llm, comm.stats.calls, stats.forwards - forwards_before, len(outputs), elapsed)
    finally:
        llm.close()
    return 0


def print_layout(llm, calls: dict[str, int], forwards: int, texts: int, elapsed: float) -> None:  # noqa: ANN001
    """One short block on stderr: what tensor parallelism did, as rank 0 saw it."""
    engine, config = llm.engine, llm.config
    tp, layers = engine.ctx.tp_size, config.num_hidden_layers
    element = next(engine.model.parameters()).element_size()
    whole = config.num_parameters
    # each sum across the ranks is an all-reduce, or with shared memory a sum split by rows (an exchange of each
    # rank's rows, then a barrier once every rank wrote its share: counted as a reduce-scatter and an all-gather)
    split = calls.get("reduce_scatter", 0)
    sums = (calls.get("all_reduce", 0) + split) / max(1, forwards)
    lines = [
        f"--- tensor parallelism: tp={tp}, {config.model_type}, {layers} layers ---",
        f"per rank : {engine.param_count:,} parameters, {human_bytes(engine.param_bytes)}"
        f"  (whole model {whole:,}, {human_bytes(whole * element)}; {100 * engine.param_count / whole:.0f}% on rank 0)",
        f"per batch: {sums:.0f} sums across ranks = 2 x {layers} layers + 1 embedding"
        + (f", {100 * split / forwards / sums:.0f}% of them split by rows through shared memory" if split else "")
        if tp > 1
        else "per batch: no collectives (tp=1)",
        f"speed    : {texts} texts in {forwards} batches in {elapsed:.2f}s = {texts / elapsed:.1f} texts/s",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)
