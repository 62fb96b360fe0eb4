"""The plan: every TP size with its verdict, every TP x PP x DP layout of the cluster with its memory and speed.

``make_plan(model, request)`` is the planner's one entry point; ``advice.py`` picks the layout and
``report.py`` renders the result as text or JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpinfer.parallel import shard
from tpinfer.planner.advice import MIN_KV_FRACTION, Recommendation, rank_layouts, recommend, warnings
from tpinfer.planner.comm import Placement, StepEstimate, estimate_step, placement
from tpinfer.planner.dtypes import DType
from tpinfer.planner.hardware import Device, Link
from tpinfer.planner.memory import Layout, MemoryEstimate, estimate_memory
from tpinfer.planner.model import (
    ModelSpec,
    kv_replication,
    local_kv_heads,
    rank_bytes,
    reason_kind,
    tp_failure_reason,
)

OBJECTIVES = ("latency", "throughput")


@dataclass(frozen=True)
class PlanRequest:
    device: Device
    gpus_per_node: int
    nodes: int
    intra: Link  # between GPUs of a node
    network: Link  # between nodes
    dtype: DType
    max_model_len: int
    batch: int  # sequences decoded together by each replica
    objective: str = "latency"

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class TPSize:
    tp: int
    reason: str | None  # why it cannot shard the model; None when valid
    heads_per_gpu: int | None = None
    kv_heads_per_gpu: int | None = None
    kv_replication: int | None = None  # ranks holding each KV head
    ffn_per_gpu: int | None = None
    vocab_padding: int | None = None  # rows added so the vocabulary divides by tp
    weight_bytes_per_gpu: int | None = None  # at pp=1

    @property
    def valid(self) -> bool:
        return self.reason is None

    @property
    def kind(self) -> str | None:
        return None if self.reason is None else reason_kind(self.reason)


@dataclass(frozen=True)
class LayoutEstimate:
    layout: Layout
    memory: MemoryEstimate
    placement: Placement
    step_short: StepEstimate | None  # batch at an empty context: the ceiling
    step_full: StepEstimate | None  # batch at max_model_len tokens of context each
    step_busy: StepEstimate | None  # max_sequences at max_model_len tokens of context each
    max_sequences: int  # sequences of max_model_len tokens a replica holds KV cache for (0 if it does not fit)

    @property
    def fits(self) -> bool:
        return self.memory.fits

    @property
    def has_kv_room(self) -> bool:
        return self.fits and self.memory.kv_room >= MIN_KV_FRACTION * self.memory.capacity


@dataclass(frozen=True)
class Plan:
    model: ModelSpec
    request: PlanRequest
    tp_sizes: tuple[TPSize, ...]
    layouts: tuple[LayoutEstimate, ...]  # ranked, the recommended one first
    recommendation: Recommendation
    warnings: tuple[str, ...]

    @property
    def valid_tp_sizes(self) -> list[int]:
        return [row.tp for row in self.tp_sizes if row.valid]


def tp_sizes(model: ModelSpec, dtype: DType) -> tuple[TPSize, ...]:
    """Every TP size from 1 to the head count, valid or not, with what each rank holds."""
    rows = []
    for tp in range(1, model.num_attention_heads + 1):
        reason = tp_failure_reason(model, tp)
        if reason:
            rows.append(TPSize(tp, reason))
            continue
        rows.append(
            TPSize(
                tp,
                None,
                heads_per_gpu=model.num_attention_heads // tp,
                kv_heads_per_gpu=local_kv_heads(model, tp),
                kv_replication=kv_replication(model, tp),
                ffn_per_gpu=model.intermediate_size // tp,
                vocab_padding=shard.padded_vocab_size(model.vocab_size, tp) - model.vocab_size,
                weight_bytes_per_gpu=rank_bytes(model, tp, dtype).total(model.num_hidden_layers),
            )
        )
    return tuple(rows)


def candidate_layouts(model: ModelSpec, total_gpus: int) -> list[Layout]:
    """Every TP x PP x DP using all GPUs, with a valid TP size and at most one layer per stage."""
    layouts = []
    for tp in shard.valid_tp_sizes(model):  # type: ignore[arg-type]
        for pp in range(1, min(model.num_hidden_layers, total_gpus) + 1):
            if total_gpus % (tp * pp) == 0:
                layouts.append(Layout(tp, pp, total_gpus // (tp * pp)))
    return layouts


def estimate_layout(model: ModelSpec, layout: Layout, request: PlanRequest) -> LayoutEstimate:
    r = request
    memory = estimate_memory(model, layout, r.dtype, r.device, r.gpus_per_node, r.max_model_len, r.batch)

    def step(batch: int, context: int) -> StepEstimate | None:
        m = estimate_memory(model, layout, r.dtype, r.device, r.gpus_per_node, r.max_model_len, batch)
        return estimate_step(model, layout, m, r.dtype, r.device, r.gpus_per_node, r.intra, r.network, batch, context)

    busy = memory.max_sequences(r.max_model_len) if memory.fits else 0
    return LayoutEstimate(
        layout,
        memory,
        placement(layout, r.gpus_per_node),
        step(r.batch, 0),
        step(r.batch, r.max_model_len),
        step(busy, r.max_model_len) if busy else None,
        busy,
    )


def make_plan(model: ModelSpec, request: PlanRequest) -> Plan:
    """Everything ``tpinfer plan`` prints, from the model's numbers and the cluster's description."""
    if request.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {request.objective!r}")
    for name, value in (
        ("gpus per node", request.gpus_per_node),
        ("nodes", request.nodes),
        ("batch size", request.batch),
        ("max model length", request.max_model_len),
    ):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    estimates = [estimate_layout(model, layout, request) for layout in candidate_layouts(model, request.total_gpus)]
    recommendation = recommend(model, request, estimates)
    ranked = rank_layouts(request, estimates, recommendation.layout)
    return Plan(
        model,
        request,
        tp_sizes(model, request.dtype),
        tuple(ranked),
        recommendation,
        tuple(warnings(model, request, ranked, recommendation)),
    )
