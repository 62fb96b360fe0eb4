"""Which layout to use, following the seeds' decision tree, with the reasoning as sentences.

- fits on one GPU: one GPU per replica, DP over the rest;
- fast interconnect: TP within a node; latency takes the largest valid TP, throughput the smallest that
  leaves room for KV cache, replicated with DP;
- more than one node: TP within each node, PP across nodes;
- no fast interconnect: PP (for latency, TP is kept when the numbers say it is still faster).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tpinfer.planner.comm import all_reduce_seconds
from tpinfer.planner.memory import Layout, total_weight_bytes
from tpinfer.planner.model import ModelSpec, kv_replication
from tpinfer.planner.units import gib, percent, seconds, size

if TYPE_CHECKING:
    from tpinfer.planner.plan import LayoutEstimate, PlanRequest

MIN_KV_FRACTION = 0.25  # "room for KV cache": at least this share of a GPU's memory left for it


@dataclass(frozen=True)
class Recommendation:
    layout: Layout
    fits: bool
    reasons: tuple[str, ...]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _step(e: LayoutEstimate) -> float:
    """The decode step at an empty context: the figure the ceiling is quoted from."""
    return e.step_short.step_s if e.step_short else float("inf")


def _room(e: LayoutEstimate) -> str:
    m = e.memory
    return f"{gib(m.kv_room)} ({percent(m.kv_room / m.capacity)})"


def _holder(r: PlanRequest) -> str:
    """What one rank's memory is, in words: one GPU, or one rank's share of a CPU host."""
    return f"one rank's share of the {r.device.name} host" if r.device.shared_host else f"one {r.device.name}"


def _dp_sentence(e: LayoutEstimate, r: PlanRequest) -> list[str]:
    if e.layout.dp == 1:
        return []
    return [
        f"The {e.layout.dp} groups of {e.layout.model_parallel} {r.device.unit}(s) each hold a replica "
        f"(DP={e.layout.dp}): replicas never communicate, so throughput grows with their number."
    ]


def _fits_one_gpu(model: ModelSpec, r: PlanRequest, single: LayoutEstimate, faster: LayoutEstimate | None) -> list[str]:
    m = single.memory
    out = [
        f"{model.name} needs {gib(m.per_gpu.total)} on one {r.device.unit} ({gib(m.per_gpu.weights)} of "
        f"{r.dtype.name} weights), which fits {_holder(r)} ({gib(m.capacity)}): the seeds' decision tree says "
        "use a single GPU."
    ]
    if r.objective == "throughput":
        out.append(
            f"It leaves {_room(single)} for KV cache, room for {single.max_sequences} sequences "
            f"of {r.max_model_len} tokens."
        )
    out += _dp_sentence(single, r)
    if faster is not None and faster.step_short and single.step_short:
        out.append(
            f"If per-token latency matters more than GPU count, {faster.layout.label} would cut the decode step "
            f"from {seconds(_step(single))} to {seconds(_step(faster))} "
            "(see the alternatives)."
        )
    return out


def _fast_branch(
    model: ModelSpec, r: PlanRequest, by: dict[tuple[int, int], LayoutEstimate]
) -> tuple[LayoutEstimate | None, list[str]]:
    out = [
        f"{r.intra.name} is a fast interconnect, so use tensor parallelism within a node: its all-reduces "
        f"stay on {r.intra.name}."
    ]
    node_tps = [tp for tp, pp in by if pp == 1 and tp <= r.gpus_per_node and r.gpus_per_node % tp == 0]
    pps = [pp for pp in _divisors(r.nodes) if pp <= model.num_hidden_layers]
    pick = None
    if r.objective == "latency":
        tp = max(node_tps)
        pick = next((by[tp, pp] for pp in pps if (tp, pp) in by and by[tp, pp].fits), None)
        if pick:
            step = f" (decode step about {seconds(_step(pick))})" if pick.step_short else ""
            out.append(
                f"For latency take the largest valid TP within a node, TP={tp}: each of the {tp} GPUs reads "
                f"1/{tp} of the weights per token{step}."
            )
            across = [e for e in by.values() if e.fits and e.placement.tp_crosses_nodes and _step(e) < _step(pick)]
            if across:
                e = min(across, key=_step)
                out.append(
                    f"{e.layout.label} is estimated faster ({seconds(_step(e))}) but puts "
                    f"{e.step_short.all_reduces} all-reduces per token on {r.network.name}, where congestion and "
                    "jitter (not modelled) stall every layer; the seeds keep TP inside a node."
                )
    else:
        tried = []
        for tp in sorted(node_tps):
            pick = next((by[tp, pp] for pp in pps if (tp, pp) in by and by[tp, pp].has_kv_room), None)
            if pick:
                break
            fitting = [by[tp, pp] for pp in pps if (tp, pp) in by and by[tp, pp].fits]
            if fitting:
                tried.append(f"TP={tp} leaves only {_room(fitting[0])}")
        if pick is None:
            fitting = [by[tp, pp] for tp in node_tps for pp in pps if (tp, pp) in by and by[tp, pp].fits]
            pick = max(fitting, key=lambda e: e.memory.kv_room, default=None)
        if pick:
            tried.append(
                f"TP={pick.layout.tp} leaves {_room(pick)} per GPU, room for {pick.max_sequences} sequences of "
                f"{r.max_model_len} tokens per replica"
            )
            out.append(
                f"For throughput take the smallest TP that fits with room for KV cache, at least "
                f"{percent(MIN_KV_FRACTION)} of memory: {'; '.join(tried)}."
            )
            bigger = [by[tp, pick.layout.pp] for tp in node_tps if tp > pick.layout.tp and (tp, pick.layout.pp) in by]
            if bigger and bigger[-1].step_busy:
                out += _bigger_tp_sentences(pick, bigger[-1], r)
    if pick and pick.layout.pp > 1:
        alone = by.get((pick.layout.tp, 1))
        need = f" needs {gib(alone.memory.per_gpu.total)} per GPU," if alone else ""
        out.append(
            f"TP={pick.layout.tp} alone{need} more than {_holder(r)} holds, so keep TP within each node "
            f"and add PP={pick.layout.pp} across nodes: only one {size(_message(model, r))} activation per "
            f"stage boundary crosses {r.network.name} per step, instead of 2 all-reduces per layer."
        )
    return pick, out


def _full_load_tokens_per_s(e: LayoutEstimate) -> float:
    s = e.step_busy
    return s.batch * s.tokens_per_s_per_sequence * e.layout.dp if s else 0.0


def _bigger_tp_sentences(pick: LayoutEstimate, bigger: LayoutEstimate, r: PlanRequest) -> list[str]:
    """Why not the larger TP, and where the bandwidth model alone would disagree."""
    out = [
        f"A larger TP adds all-reduces to every step and scales sub-linearly: TP={bigger.layout.tp} would spend "
        f"{percent(bigger.step_busy.comm_share)} of a full-load step in them."
    ]
    mine, theirs = _full_load_tokens_per_s(pick), _full_load_tokens_per_s(bigger)
    if theirs > mine:
        out.append(
            f"At full load, every sequence at {r.max_model_len} tokens, TP={bigger.layout.tp} holds more sequences "
            f"({bigger.max_sequences} vs {pick.max_sequences * pick.layout.dp}) and the bandwidth model rates it "
            f"higher ({theirs:,.0f} vs {mine:,.0f} tokens/s): it counts all-reduces at their ideal speed and ignores "
            "the smaller, less efficient per-GPU matmuls; if you will run saturated, measure both with `tpinfer bench`."
        )
    return out


def _message(model: ModelSpec, r: PlanRequest) -> int:
    return r.batch * model.hidden_size * r.dtype.compute_bytes


def _slow_branch(
    model: ModelSpec, r: PlanRequest, by: dict[tuple[int, int], LayoutEstimate]
) -> tuple[LayoutEstimate | None, list[str]]:
    t = all_reduce_seconds(_message(model, r), r.gpus_per_node, r.intra)
    out = [
        f"{r.intra.name} is not a fast interconnect: one all-reduce of a {size(_message(model, r))} activation "
        f"costs about {seconds(t)} on it and TP needs 2 per layer, so the seeds' decision tree says pipeline "
        "parallelism."
    ]
    pps = sorted(pp for tp, pp in by if tp == 1)
    want = (lambda e: e.has_kv_room) if r.objective == "throughput" else (lambda e: e.fits)
    pp_pick = next((by[1, pp] for pp in pps if want(by[1, pp])), None)
    if pp_pick is None:
        pp_pick = next((by[1, pp] for pp in pps if by[1, pp].fits), None)
    pick = pp_pick
    if r.objective == "latency":
        in_node = [e for (tp, pp), e in by.items() if pp == 1 and 1 < tp <= r.gpus_per_node and e.fits]
        tp_pick = min(in_node, key=_step, default=None)
        if tp_pick and (pp_pick is None or _step(tp_pick) < _step(pp_pick)):
            pick = tp_pick
            if pp_pick:
                out.append(
                    f"But for latency PP does not shorten one sequence's step, its stages run one after "
                    f"another: PP={pp_pick.layout.pp} takes about {seconds(_step(pp_pick))} per token."
                )
            share = percent(tp_pick.step_short.comm_share) if tp_pick.step_short else "an unknown share"
            out.append(
                f"TP={tp_pick.layout.tp} has the shortest estimated step, about {seconds(_step(tp_pick))} even with "
                f"{share} of it in all-reduces, because each GPU reads 1/{tp_pick.layout.tp} of the weights; "
                "fewer TP ranks spend less in all-reduces but read more per GPU (see the alternatives); measure with "
                "`tpinfer bench` before committing."
            )
    if pick is pp_pick and pick is not None and pick.layout.pp > 1:
        layers = ", ".join(str(n) for n in pick.memory.stage_layers)
        out.append(
            f"PP={pick.layout.pp} splits the {model.num_hidden_layers} layers into stages of {layers}; only one "
            f"{size(_message(model, r))} activation crosses {r.intra.name} per stage boundary per step."
        )
    return pick, out


def recommend(model: ModelSpec, r: PlanRequest, estimates: list[LayoutEstimate]) -> Recommendation:
    by = {(e.layout.tp, e.layout.pp): e for e in estimates}
    single = by.get((1, 1))
    faster = min((e for e in estimates if e.fits and e.layout.tp > 1), key=_step, default=None)
    if single and (single.has_kv_room if r.objective == "throughput" else single.fits):
        if faster and _step(faster) >= _step(single):
            faster = None
        return Recommendation(single.layout, True, tuple(_fits_one_gpu(model, r, single, faster)))
    reasons = []
    if single and single.fits:
        reasons.append(f"{model.name} fits {_holder(r)} but leaves only {_room(single)} for KV cache.")
    elif single:
        reasons.append(
            f"{model.name} needs {gib(single.memory.per_gpu.total)} on one {r.device.unit} "
            f"({gib(single.memory.per_gpu.weights)} of {r.dtype.name} weights), more than "
            f"{_holder(r)} holds ({gib(single.memory.capacity)})."
        )
    if r.total_gpus == 1:
        pick, more = None, []
    elif r.intra.fast:
        pick, more = _fast_branch(model, r, by)
    else:
        pick, more = _slow_branch(model, r, by)
    reasons += more
    if pick is None:
        fitting = rank_layouts(r, [e for e in estimates if e.fits], None)
        if fitting:
            pick = fitting[0]
            reasons.append(
                f"No layout with TP inside a node and PP across nodes fits; the best that does is {pick.layout.label}."
            )
    if pick is None:
        return _nothing_fits(model, r, estimates, reasons)
    return Recommendation(pick.layout, True, tuple(reasons + _dp_sentence(pick, r)))


def _nothing_fits(
    model: ModelSpec, r: PlanRequest, estimates: list[LayoutEstimate], reasons: list[str]
) -> Recommendation:
    least = min(estimates, key=lambda e: e.memory.per_gpu.total)
    capacity = least.memory.capacity
    reasons.append(
        f"Nothing fits on {r.total_gpus} x {r.device.name} in {r.dtype.name}: even {least.layout.label} "
        f"needs {gib(least.memory.per_gpu.total)} per GPU against {gib(capacity)}."
    )
    weights = total_weight_bytes(model, r.dtype)
    reasons.append(f"The weights alone are {gib(weights)}; the GPUs hold {gib(capacity * r.total_gpus)} together.")
    if r.dtype.weight_bytes > 1:
        reasons.append(
            f"In int8 or fp8 the weights would be {gib(model.parameter_count())}; otherwise add GPUs or "
            "shorten --max-model-len."
        )
    return Recommendation(least.layout, False, tuple(reasons))


def rank_layouts(r: PlanRequest, estimates: list[LayoutEstimate], chosen: Layout | None) -> list[LayoutEstimate]:
    """Fitting layouts first, ordered by the objective; the chosen layout leads."""

    def key(e: LayoutEstimate) -> tuple:
        if not e.fits:
            return (2, e.memory.per_gpu.total)
        if r.objective == "latency":
            return (0, _step(e), e.layout.model_parallel)
        return (
            0 if e.has_kv_room else 1,
            e.layout.model_parallel,
            e.placement.tp_crosses_nodes,
            e.layout.pp,
            -e.memory.kv_room,
        )

    ranked = sorted(estimates, key=key)
    ranked.sort(key=lambda e: e.layout != chosen)
    return ranked


def warnings(model: ModelSpec, r: PlanRequest, ranked: list[LayoutEstimate], rec: Recommendation) -> list[str]:
    out = []
    chosen = ranked[0]
    if not model.engine_supported:
        out.append(
            f"{model.model_type} is counted by the planner only: tpinfer's engine runs llama, mistral and "
            "qwen2 checkpoints."
        )
    if not rec.fits:
        out.append("No layout fits in memory on this cluster (see the recommendation).")
    tp_users = [e for e in ranked if e.layout.tp > 1 and e.step_short and not e.placement.tp_crosses_nodes]
    if not r.intra.fast and r.gpus_per_node > 1 and tp_users:
        e = chosen if chosen in tp_users else tp_users[0]
        s = e.step_short
        out.append(
            f"TP over {r.intra.name} is slow: each all-reduce costs about {seconds(s.all_reduce_s)} "
            f"({r.intra.latency_us:g} us + {2 * (e.layout.tp - 1)} ring steps of {r.intra.hop_us:g} us + "
            f"{size(s.message_bytes)} at {r.intra.bandwidth_gbs:g} GB/s); "
            f"{e.layout.label} spends {percent(s.comm_share)} of each decode step in {s.all_reduces} of them. "
            "NVLink (SXM) GPUs are the ones made for TP."
        )
    if not r.device.p2p and r.total_gpus > 1:
        out.append(
            f"{r.device.name} has no GPU peer-to-peer copies: every message is staged through host memory "
            "(modelled as half the PCIe bandwidth and twice its latency)."
        )
    if chosen.layout.tp > model.num_key_value_heads:
        out.append(
            f"TP={chosen.layout.tp} exceeds the {model.num_key_value_heads} KV heads: each KV head and its "
            f"cache are stored on {kv_replication(model, chosen.layout.tp)} GPUs."
        )
    if model.num_hidden_layers % chosen.layout.pp:
        layers = ", ".join(str(n) for n in chosen.memory.stage_layers)
        out.append(f"PP={chosen.layout.pp} does not divide the {model.num_hidden_layers} layers: stages hold {layers}.")
    if chosen.placement.tp_crosses_nodes:
        out.append(f"The TP groups of {chosen.layout.label} span nodes: their all-reduces cross {r.network.name}.")
    if r.max_model_len > model.max_position_embeddings:
        out.append(
            f"--max-model-len {r.max_model_len} exceeds the model's max_position_embeddings "
            f"{model.max_position_embeddings}."
        )
    if r.device.bandwidth_gbs is None:
        out.append(f"The memory bandwidth of {r.device.name} is unknown: pass --memory-bandwidth GB/s for tokens/s.")
    return out
