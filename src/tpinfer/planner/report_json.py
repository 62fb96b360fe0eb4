"""The plan as one JSON object: the keys scripts rely on (``params``, ``weight_bytes``, ``valid_tp_sizes``,
``layouts`` with ``tp``/``pp``/``dp``/``per_gpu_bytes``/``fits``, ``recommended``) and everything the text shows."""

from __future__ import annotations

from typing import Any

from tpinfer.planner.comm import StepEstimate
from tpinfer.planner.dtypes import DTYPES
from tpinfer.planner.memory import total_weight_bytes
from tpinfer.planner.model import kv_bytes_per_token_per_layer
from tpinfer.planner.plan import LayoutEstimate, Plan
from tpinfer.planner.report import assumptions

SCHEMA_VERSION = 1


def _step_json(s: StepEstimate | None) -> dict[str, Any] | None:
    if s is None:
        return None
    return {
        "batch": s.batch,
        "context": s.context,
        "memory_s": s.memory_s,
        "comm_s": s.comm_s,
        "step_s": s.step_s,
        "comm_share": s.comm_share,
        "tokens_per_s_per_sequence": s.tokens_per_s_per_sequence,
        "tokens_per_s": s.batch * s.tokens_per_s_per_sequence,
    }


def _layout_json(rank: int, e: LayoutEstimate) -> dict[str, Any]:
    m, w, s = e.memory, e.memory.per_gpu, e.step_short
    layout = e.layout
    return {
        "rank": rank,
        "tp": layout.tp,
        "pp": layout.pp,
        "dp": layout.dp,
        "gpus": layout.world_size,
        "stage_layers": list(m.stage_layers),
        "per_gpu_bytes": w.total,
        "weight_bytes": w.weights,
        "kv_cache_bytes": w.kv_cache,
        "activation_bytes": w.activations,
        "overhead_bytes": w.overhead,
        "capacity_bytes": m.capacity,
        "fits": m.fits,
        "kv_room_bytes": m.kv_room,
        "kv_room_ok": e.has_kv_room,
        "max_sequences": e.max_sequences,
        "tp_crosses_nodes": e.placement.tp_crosses_nodes,
        "comm": None
        if s is None
        else {
            "all_reduces_per_token": s.all_reduces,
            "message_bytes": s.message_bytes,
            "all_reduce_s": s.all_reduce_s,
            "tp_link": s.tp_link,
            "comm_s": s.comm_s,
            "share": s.comm_share,
        },
        "decode": {
            "short_context": _step_json(e.step_short),
            "full_context": _step_json(e.step_full),
            "full_load": _step_json(e.step_busy),
        },
        "decode_ceiling_tokens_per_s": None if s is None else s.tokens_per_s_per_sequence * s.batch * layout.dp,
    }


def to_json(plan: Plan) -> dict[str, Any]:
    model, r, rec = plan.model, plan.request, plan.recommendation
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "name": model.name,
            "model_type": model.model_type,
            "engine_supported": model.engine_supported,
            "num_hidden_layers": model.num_hidden_layers,
            "hidden_size": model.hidden_size,
            "num_attention_heads": model.num_attention_heads,
            "num_key_value_heads": model.num_key_value_heads,
            "head_dim": model.head_dim,
            "intermediate_size": model.intermediate_size,
            "vocab_size": model.vocab_size,
            "max_position_embeddings": model.max_position_embeddings,
        },
        "params": model.parameter_count(),
        "active_params": model.active_parameter_count(),
        "dtype": r.dtype.name,
        "weight_bytes": total_weight_bytes(model, r.dtype),
        "weight_bytes_by_dtype": {name: total_weight_bytes(model, d) for name, d in DTYPES.items()},
        "kv_cache_bytes_per_token": kv_bytes_per_token_per_layer(model, 1, r.dtype.compute_bytes)
        * model.num_hidden_layers,
        "cluster": {
            "device": r.device.name,
            "memory_bytes": r.device.memory_bytes,
            "memory_bandwidth_gbs": r.device.bandwidth_gbs,
            "gpus_per_node": r.gpus_per_node,
            "nodes": r.nodes,
            "interconnect": {
                "name": r.intra.name,
                "latency_us": r.intra.latency_us,
                "hop_us": r.intra.hop_us,
                "bandwidth_gbs": r.intra.bandwidth_gbs,
                "fast": r.intra.fast,
            },
            "network": {
                "name": r.network.name,
                "latency_us": r.network.latency_us,
                "hop_us": r.network.hop_us,
                "bandwidth_gbs": r.network.bandwidth_gbs,
                "fast": r.network.fast,
            },
        },
        "max_model_len": r.max_model_len,
        "batch_size": r.batch,
        "objective": r.objective,
        "valid_tp_sizes": plan.valid_tp_sizes,
        "tp_sizes": [
            {
                "tp": t.tp,
                "valid": t.valid,
                "reason": t.reason,
                "kind": t.kind,
                "heads_per_gpu": t.heads_per_gpu,
                "kv_heads_per_gpu": t.kv_heads_per_gpu,
                "kv_replication": t.kv_replication,
                "ffn_per_gpu": t.ffn_per_gpu,
                "vocab_padding": t.vocab_padding,
                "weight_bytes_per_gpu": t.weight_bytes_per_gpu,
            }
            for t in plan.tp_sizes
        ],
        "layouts": [_layout_json(i + 1, e) for i, e in enumerate(plan.layouts)],
        "recommended": {
            "tp": rec.layout.tp,
            "pp": rec.layout.pp,
            "dp": rec.layout.dp,
            "fits": rec.fits,
            "reason": " ".join(rec.reasons),
            "reasons": list(rec.reasons),
        },
        "warnings": list(plan.warnings),
        "assumptions": assumptions(plan),
    }
