"""tpinfer info: a checkpoint's shapes, valid TP sizes and bytes per rank, without loading weights."""

from __future__ import annotations

import argparse
import json

from tpinfer.cli.common import human_bytes, model_path

EPILOG = """examples:
  tpinfer info --model ./my-llama --dtype bfloat16
  tpinfer info --model ./Mixtral-8x7B-v0.1 --json

mixture-of-experts models (mixtral, qwen2_moe, qwen3_moe) also show the active parameters per token (top-k of
the experts in each MoE layer, everything else whole), the bytes per rank under both --moe-parallel layouts
(tensor: every expert split over the ranks; expert: whole experts per rank, valid when the experts divide by
the size) and the all-reduces per decode token. --json adds "active_parameters" (every model), MoE shapes and
"moe_valid_tp_sizes" {"tensor": [...], "expert": [...]}, and in each "tp_sizes" entry "moe": {"tensor": {...},
"expert": {...}}, each {"valid", "bytes_per_rank", "all_reduces_per_token", "all_reduce_message_bytes",
"all_reduce_bytes_per_token"} or {"valid": false, "reason"}."""

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="shapes, valid TP sizes and per-rank bytes of a checkpoint (no weights loaded)",
        description="Read config.json and print the model's shapes, which tensor-parallel sizes work (and why "
        "the others do not), and the parameter bytes each rank holds at each valid size; for a mixture-of-experts "
        "model also its active parameters per token and, for both expert layouts, the bytes per rank and the "
        "all-reduces per decode token.",
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
    from tpinfer.models.family import CAUSAL_LM
    from tpinfer.parallel.plan import MOE_LAYOUTS, PlanError, quantized_projections, resolve_plan
    from tpinfer.parallel.shard import (
        active_parameters,
        kv_cache_bytes_per_token,
        kv_head_range,
        rank_parameter_bytes,
        tp_failure_reason,
    )

    config = ModelConfig.from_pretrained(path)
    # the checkpoint's own formats (GGUF, compressed-tensors) or the one asked for, as the engine decides
    spec = EngineSpec(model=path, quantization=quantization, quantize_lm_head=quantize_lm_head)
    scheme, head = spec.schemes(open_checkpoint(path, config)), spec.head_scheme()
    schemes = quantized_projections(config, scheme, head)
    if dtype == "auto":
        dtype = config.torch_dtype if config.torch_dtype in BYTES else "float32"
    element = BYTES[dtype]
    candidates = range(1, config.num_attention_heads + 1)
    moe = moe_layouts(config, candidates, element, scheme, head) if config.family.expert_plan is not None else None
    sizes = []
    for tp in candidates:
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
            # An encoder keeps no KV cache: each forward sees its whole input.
            entry["kv_cache_bytes_per_token"] = (kv_cache_bytes_per_token(config, tp, 0, element)
                                                 if config.family.kind == CAUSAL_LM else 0)
        if moe is not None:
            entry["moe"] = moe[tp]
        sizes.append(entry)
    info = {
        "model": path,
        "model_type": config.model_type,
        "kind": config.family.kind,  # "causal_lm" or "encoder"
        "dtype": dtype,
        "quantization": (", ".join(sorted({s.name for s in schemes.values()})) or None) if schemes else None,
        "params": config.num_parameters,
        "active_parameters": active_parameters(config),
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
    if moe is not None:
        info["shapes"] |= {
            "num_experts": config.num_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "moe_intermediate_size": config.moe_intermediate_size,
            "shared_expert_intermediate_size": config.shared_expert_intermediate_size,
            "moe_layers": len(config.moe_layers),
        }
        info["moe_valid_tp_sizes"] = {layout: [s["tp"] for s in sizes if s["moe"][layout]["valid"]]
                                      for layout in MOE_LAYOUTS}
    return info


def moe_layouts(config, sizes: range, element: int, scheme, head) -> dict[int, dict[str, dict]]:  # noqa: ANN001
    """TP size -> --moe-parallel layout -> what a rank holds under the plan the engine resolves for that layout:
    its parameter bytes (rank 0's; every rank holds the same) and the all-reduces of one decode token, each of one
    token's hidden state (the planner's count); or why the plan cannot run at that size (resolve_plan's reason)."""
    from tpinfer.parallel.plan import MOE_LAYOUTS, PlanError, resolve_plan, tp_failures
    from tpinfer.parallel.shard import rank_parameter_bytes
    from tpinfer.planner.comm import tp_all_reduces

    modules = config.family.modules(config)
    message = config.hidden_size * element
    out: dict[int, dict[str, dict]] = {tp: {} for tp in sizes}
    for layout in MOE_LAYOUTS:
        try:  # the strategies and formats do not depend on the size; resolve_plan then checks the size
            plan = resolve_plan(config, 1, "auto", scheme, head, layout)
        except PlanError as exc:
            for tp in sizes:
                out[tp][layout] = {"valid": False, "reason": str(exc).split("; valid sizes")[0]}
            continue
        for tp, reason in tp_failures(modules, plan.strategies, sizes, plan.schemes).items():
            if reason:
                out[tp][layout] = {"valid": False, "reason": reason}
                continue
            count = tp_all_reduces(config.num_hidden_layers, tp)
            out[tp][layout] = {
                "valid": True,
                "bytes_per_rank": rank_parameter_bytes(config, tp, 0, element, plan.schemes, plan.strategies),
                "all_reduces_per_token": count,
                "all_reduce_message_bytes": message,
                "all_reduce_bytes_per_token": count * message,
            }
    return out


def run(args: argparse.Namespace) -> int:
    info = model_info(model_path(args), args.dtype, args.quantization, args.quantize_lm_head)
    if args.json:
        print(json.dumps(info))
        return 0
    s = info["shapes"]
    quant = f", projections {info['quantization']}" if info["quantization"] else ""
    kind = ", an encoder: no KV cache" if info["kind"] == "encoder" else ""
    print(f"{info['model']}  ({info['model_type']}{kind}, {info['dtype']}{quant})")
    print(f"  {info['params']:,} parameters = {human_bytes(info['param_bytes'])}")
    print(f"  hidden {s['hidden_size']}, {s['num_hidden_layers']} layers, {s['num_attention_heads']} heads "
          f"({s['num_key_value_heads']} KV heads, head_dim {s['head_dim']}), FFN {s['intermediate_size']}, "
          f"vocab {s['vocab_size']}{', tied embeddings' if s['tie_word_embeddings'] else ''}")
    if s["sliding_layers"]:
        print(f"  {s['sliding_layers']} of {s['num_hidden_layers']} layers attend a sliding window of "
              f"{s['sliding_window']} positions (their KV cache stops growing there; KV cache/token below counts "
              "every layer)")
    if "moe_valid_tp_sizes" in info:
        return _print_moe(info)
    print(f"  valid TP sizes: {', '.join(map(str, info['valid_tp_sizes']))}")
    print(f"\n  {'tp':>3}  {'heads/rank':>10}  {'kv/rank':>7}  {'bytes/rank':>12}  {'KV cache/token':>14}")
    for e in info["tp_sizes"]:
        if e["valid"]:
            print(f"  {e['tp']:>3}  {e['heads_per_rank']:>10}  {e['kv_heads_per_rank']:>7}  "
                  f"{human_bytes(e['param_bytes_per_rank']):>12}  {human_bytes(e['kv_cache_bytes_per_token']):>14}")
        else:
            print(f"  {e['tp']:>3}  invalid: {e['reason']}")
    return 0


def _print_moe(info: dict) -> int:
    """The rest of the text output for a mixture-of-experts model: experts, active parameters, and a table with the
    bytes per rank of both expert layouts and the all-reduces per decode token."""
    s, valid = info["shapes"], info["moe_valid_tp_sizes"]
    shared = (f", a shared expert of FFN {s['shared_expert_intermediate_size']}"
              if s["shared_expert_intermediate_size"] else "")
    expert_sizes = ", ".join(map(str, valid["expert"])) or "none"
    print(f"  {s['num_experts']} experts of FFN {s['moe_intermediate_size']} in {s['moe_layers']} of "
          f"{s['num_hidden_layers']} layers{shared}, top {s['num_experts_per_tok']} per token: "
          f"{info['active_parameters']:,} active parameters per token")
    print(f"  valid TP sizes: {', '.join(map(str, valid['tensor']))} (--moe-parallel tensor), "
          f"{expert_sizes} (--moe-parallel expert)")
    print(f"\n  {'tp':>3}  {'heads/rank':>10}  {'kv/rank':>7}  {'bytes/rank tensor':>17}  {'bytes/rank expert':>17}  "
          f"{'KV cache/token':>14}  {'all-reduces/token':>17}")
    notes = []
    for e in info["tp_sizes"]:
        tensor, expert = e["moe"]["tensor"], e["moe"]["expert"]
        if not e["valid"]:
            held = f"; --moe-parallel expert: {human_bytes(expert['bytes_per_rank'])}/rank" if expert["valid"] else ""
            print(f"  {e['tp']:>3}  invalid: {e['reason']}{held}")
            continue
        if not expert["valid"]:
            notes.append(f"  --moe-parallel expert at tp={e['tp']}: {expert['reason']}; valid sizes: {expert_sizes}")
        comm = (f"{tensor['all_reduces_per_token']} x {human_bytes(tensor['all_reduce_message_bytes'])}"
                if tensor["all_reduces_per_token"] else "none")
        print(f"  {e['tp']:>3}  {e['heads_per_rank']:>10}  {e['kv_heads_per_rank']:>7}  "
              f"{human_bytes(tensor['bytes_per_rank']):>17}  "
              f"{human_bytes(expert['bytes_per_rank']) if expert['valid'] else 'invalid':>17}  "
              f"{human_bytes(e['kv_cache_bytes_per_token']):>14}  {comm:>17}")
    print("\n  all-reduces/token: one decode token's in either layout, each of one hidden state: the embedding's,\n"
          "  then attention's and the MoE block's (or dense MLP's) in every layer")
    for note in notes:
        print(note)
    return 0
