"""tpinfer info: a checkpoint's shapes, valid TP sizes and bytes per rank, without loading weights."""

from __future__ import annotations

import argparse
import json

from tpinfer.cli.common import human_bytes, model_path

EPILOG = """example:
  tpinfer info --model ./my-llama --dtype bfloat16"""

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="shapes, valid TP sizes and per-rank bytes of a checkpoint (no weights loaded)",
        description="Read config.json and print the model's shapes, which tensor-parallel sizes work (and why "
        "the others do not), and the parameter bytes each rank holds at each valid size.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="HF checkpoint directory (default: the bundled demo model)")
    parser.add_argument("--dtype", default="auto", choices=("auto", *BYTES), help="dtype to count bytes in")
    parser.add_argument("--quantization", "-q", default=None, metavar="SCHEME",
                        help="count the projections as tpinfer --quantization SCHEME stores them (int8, int4, fp8, ...)")
    parser.add_argument("--quantize-lm-head", nargs="?", const=True, default=False, metavar="SCHEME",
                        help="count the LM head quantized too (as tpinfer --quantize-lm-head stores it)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def model_info(path: str, dtype: str = "auto", quantization: str | None = None,
               quantize_lm_head: bool | str = False) -> dict:
    from tpinfer.config import ModelConfig
    from tpinfer.engine.runtime import EngineSpec
    from tpinfer.loading.checkpoint import open_checkpoint
    from tpinfer.parallel.plan import PlanError, quantized_projections, resolve_plan
    from tpinfer.parallel.shard import kv_cache_bytes_per_token, kv_head_range, rank_parameter_bytes, tp_failure_reason

    config = ModelConfig.from_pretrained(path)
    # the checkpoint's own formats (GGUF, compressed-tensors) or the one asked for, as the engine decides
    spec = EngineSpec(model=path, quantization=quantization, quantize_lm_head=quantize_lm_head)
    scheme, head = spec.schemes(open_checkpoint(path, config)), spec.head_scheme()
    schemes = quantized_projections(config, scheme, head)
    if dtype == "auto":
        dtype = config.torch_dtype if config.torch_dtype in BYTES else "float32"
    element = BYTES[dtype]
    sizes = []
    for tp in range(1, config.num_attention_heads + 1):
        reason = tp_failure_reason(config, tp)
        if reason is None and scheme is not None:
            try:
                resolve_plan(config, tp, "auto", scheme, head)
            except PlanError as exc:
                reason = str(exc).split("; valid sizes")[0]
        entry: dict = {"tp": tp, "valid": reason is None}
        if reason:
            entry["reason"] = reason
        else:
            entry["param_bytes_per_rank"] = rank_parameter_bytes(config, tp, 0, element, schemes)
            entry["heads_per_rank"] = config.num_attention_heads // tp
            entry["kv_heads_per_rank"] = kv_head_range(config.num_key_value_heads, 0, tp)[1]
            entry["kv_cache_bytes_per_token"] = kv_cache_bytes_per_token(config, tp, 0, element)
        sizes.append(entry)
    return {
        "model": path,
        "model_type": config.model_type,
        "dtype": dtype,
        "quantization": (", ".join(sorted({s.name for s in schemes.values()})) or None) if schemes else None,
        "params": config.num_parameters,
        "param_bytes": rank_parameter_bytes(config, 1, 0, element, schemes) if schemes else (
            config.num_parameters * element),
        "shapes": {
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "tie_word_embeddings": config.tie_word_embeddings,
            "sliding_window": config.sliding_window,
            "sliding_layers": sum(1 for i in range(config.num_hidden_layers) if config.window(i) is not None),
        },
        "valid_tp_sizes": [s["tp"] for s in sizes if s["valid"]],
        "tp_sizes": sizes,
    }


def run(args: argparse.Namespace) -> int:
    info = model_info(model_path(args), args.dtype, args.quantization, args.quantize_lm_head)
    if args.json:
        print(json.dumps(info))
        return 0
    s = info["shapes"]
    quant = f", projections {info['quantization']}" if info["quantization"] else ""
    print(f"{info['model']}  ({info['model_type']}, {info['dtype']}{quant})")
    print(f"  {info['params']:,} parameters = {human_bytes(info['param_bytes'])}")
    print(f"  hidden {s['hidden_size']}, {s['num_hidden_layers']} layers, {s['num_attention_heads']} heads "
          f"({s['num_key_value_heads']} KV heads, head_dim {s['head_dim']}), FFN {s['intermediate_size']}, "
          f"vocab {s['vocab_size']}{', tied embeddings' if s['tie_word_embeddings'] else ''}")
    if s["sliding_layers"]:
        print(f"  {s['sliding_layers']} of {s['num_hidden_layers']} layers attend a sliding window of "
              f"{s['sliding_window']} positions (their KV cache stops growing there; KV cache/token below counts "
              "every layer)")
    print(f"  valid TP sizes: {', '.join(map(str, info['valid_tp_sizes']))}")
    print(f"\n  {'tp':>3}  {'heads/rank':>10}  {'kv/rank':>7}  {'bytes/rank':>12}  {'KV cache/token':>14}")
    for e in info["tp_sizes"]:
        if e["valid"]:
            print(f"  {e['tp']:>3}  {e['heads_per_rank']:>10}  {e['kv_heads_per_rank']:>7}  "
                  f"{human_bytes(e['param_bytes_per_rank']):>12}  {human_bytes(e['kv_cache_bytes_per_token']):>14}")
        else:
            print(f"  {e['tp']:>3}  invalid: {e['reason']}")
    return 0
