"""Render a ``Plan`` as plain text: aligned tables, the reasoning as sentences, warnings and assumptions."""

from __future__ import annotations

from tpinfer.planner.dtypes import DTYPES
from tpinfer.planner.hardware import Link
from tpinfer.planner.memory import PREFILL_CHUNK_TOKENS, total_weight_bytes
from tpinfer.planner.model import kv_bytes_per_token_per_layer
from tpinfer.planner.plan import Plan, TPSize
from tpinfer.planner.units import count, gb, gib, percent, rate, seconds, size


def table(header: list[str], rows: list[list[str]], indent: str = "  ") -> str:
    """Columns padded to their widest cell; numbers (cells starting with a digit) right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str], head: bool = False) -> str:
        out = []
        for cell, width in zip(cells, widths, strict=True):
            numeric = not head and cell[:1].isdigit()
            out.append(cell.rjust(width) if numeric else cell.ljust(width))
        return (indent + "  ".join(out)).rstrip()

    return "\n".join([line(header, head=True)] + [line(r) for r in rows])


def _link(link: Link) -> str:
    return (
        f"{link.name}: latency {link.latency_us:g} us, hop {link.hop_us:g} us, {link.bandwidth_gbs:g} GB/s per "
        f"direction ({link.description})"
    )


def assumptions(plan: Plan) -> list[str]:
    r = plan.request
    bw = f"{r.device.bandwidth_gbs:g} GB/s" if r.device.bandwidth_gbs else "unknown"
    shared = " (shared by the ranks on the host)" if r.device.shared_host else ""
    return [
        f"Weights: {r.dtype.name} ({_weight_format(r.dtype)}); vocabulary padded to a multiple of TP "
        "as the engine allocates it; with PP and tied embeddings the last stage holds its own lm_head.",
        f"KV cache: batch x max_model_len x 2 (K, V) x KV heads on the GPU x head_dim x layers on the stage x "
        f"{r.dtype.compute_bytes} bytes ({r.dtype.compute}).",
        f"Activation workspace: one layer's live tensors for {PREFILL_CHUNK_TOKENS} prefill tokens (or the batch, if "
        "larger), fused attention without a T x T score matrix, plus fp32 logits over the padded vocabulary.",
        f"Runtime overhead: {r.device.context_gib:g} GiB context per process"
        + (
            "."
            if r.device.shared_host
            else ", plus 0.5 GiB of NCCL buffers per GPU when a replica has more than one rank."
        ),
        f"Memory: {r.device.name}, {r.device.memory_gib:g} GiB and {bw} per device{shared}; a layout fits when its "
        "fullest GPU's total is at most that memory.",
        f"Communication: per decode step 2 all-reduces per layer + 1 for the embedding over TP ranks, of batch x "
        f"hidden x {r.dtype.compute_bytes} bytes; ring all-reduce over n ranks = latency + 2(n-1) x (hop + bytes/n / "
        f"bandwidth); {_link(r.intra)}" + (f"; between nodes {_link(r.network)}" if r.nodes > 1 else "") + ".",
        "Decode ceiling: each step reads the GPU's weights (and the KV cache at the stated context) once at the "
        "memory bandwidth, plus communication; compute is not modelled, so tokens/s is an upper bound. PP stages run "
        "one after another for one batch (no micro-batch pipelining counted).",
    ]


def _tp_note(t: TPSize) -> str:
    notes = []
    if t.kv_replication and t.kv_replication > 1:
        notes.append(f"each KV head on {t.kv_replication} GPUs")
    if t.vocab_padding:
        notes.append(f"vocab padded by {t.vocab_padding} row{'s' if t.vocab_padding > 1 else ''}")
    return "; ".join(notes)


def _generic_reason(plan: Plan, t: TPSize) -> str:
    m = plan.model
    return {
        "heads": f"{m.num_attention_heads} attention heads are not divisible by tp",
        "kv_heads": f"{m.num_key_value_heads} KV heads are neither divisible by tp nor a divisor of it",
        "ffn": f"intermediate_size {m.intermediate_size} is not divisible by tp",
    }.get(t.kind or "", t.reason or "")


def tp_table(plan: Plan) -> str:
    """Every TP size; runs of invalid sizes failing the same constraint share one row."""
    rows: list[list[str]] = []
    sizes = list(plan.tp_sizes)
    i = 0
    while i < len(sizes):
        t = sizes[i]
        if t.valid:
            rows.append(
                [
                    str(t.tp),
                    "yes",
                    str(t.heads_per_gpu),
                    str(t.kv_heads_per_gpu),
                    str(t.ffn_per_gpu),
                    gib(t.weight_bytes_per_gpu or 0),
                    _tp_note(t),
                ]
            )
            i += 1
            continue
        j = i
        while j + 1 < len(sizes) and not sizes[j + 1].valid and sizes[j + 1].kind == t.kind:
            j += 1
        label = str(t.tp) if j == i else f"{t.tp}-{sizes[j].tp}"
        rows.append([label, "no", "", "", "", "", t.reason if j == i else _generic_reason(plan, t)])
        i = j + 1
    return table(["tp", "valid", "heads/GPU", "KV heads/GPU", "FFN/GPU", "weights/GPU", "note / reason"], rows)


def memory_table(plan: Plan) -> str:
    rows = []
    for n, e in enumerate(plan.layouts, 1):
        w = e.memory.per_gpu
        room = f"{gib(e.memory.kv_room)} ({percent(e.memory.kv_room / e.memory.capacity)})" if e.fits else "-"
        rows.append(
            [
                str(n),
                e.layout.label,
                gib(w.weights),
                gib(w.kv_cache),
                gib(w.activations),
                gib(w.overhead),
                gib(w.total),
                "yes" if e.fits else "NO",
                room,
                str(e.max_sequences) if e.fits else "-",
            ]
        )
    header = ["#", "layout", "weights", "KV cache", "workspace", "overhead", "total", "fits", "free for KV", "max seqs"]
    return table(header, rows)


def speed_table(plan: Plan) -> str:
    rows = []
    any_fits = any(e.fits for e in plan.layouts)
    for n, e in enumerate(plan.layouts, 1):
        short, full, busy = e.step_short, e.step_full, e.step_busy
        if short is None or full is None or (any_fits and not e.fits):
            continue
        dp = e.layout.dp
        load = f"{busy.batch * dp} seqs: {rate(busy.batch * dp * busy.tokens_per_s_per_sequence)}" if busy else "-"
        rows.append(
            [
                str(n),
                e.layout.label,
                short.tp_link if e.layout.tp > 1 else "-",
                str(short.all_reduces),
                seconds(short.all_reduce_s) if e.layout.tp > 1 else "-",
                seconds(short.comm_s),
                percent(short.comm_share),
                seconds(short.step_s),
                rate(short.tokens_per_s_per_sequence),
                rate(full.tokens_per_s_per_sequence),
                rate(short.batch * dp * short.tokens_per_s_per_sequence),
                load,
            ]
        )
    header = [
        "#",
        "layout",
        "TP link",
        "all-reduces",
        "each",
        "comm/step",
        "share",
        "step",
        "tok/s/seq",
        "at full ctx",
        "cluster tok/s",
        "full load tok/s",
    ]
    return table(header, rows)


def to_text(plan: Plan) -> str:
    m, r, rec = plan.model, plan.request, plan.recommendation
    cluster = f"{r.nodes} node(s) x {r.gpus_per_node} {r.device.name}, {r.intra.name}"
    if r.nodes > 1:
        cluster += f" within nodes, {r.network.name} between"
    kv_token = kv_bytes_per_token_per_layer(m, 1, r.dtype.compute_bytes) * m.num_hidden_layers
    experts = f", {m.num_local_experts} experts (top {m.num_experts_per_tok})" if m.num_local_experts else ""
    out = [
        f"tpinfer plan: {m.name} ({m.model_type}) on {cluster}",
        f"  {r.dtype.name}, max_model_len {r.max_model_len}, batch {r.batch} per replica, objective {r.objective}",
        "",
        "Model",
        f"  parameters  {count(m.parameter_count())} ({m.parameter_count():,})"
        + (f", {count(m.active_parameter_count())} active per token" if m.num_local_experts else ""),
        f"  shape       {m.num_hidden_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads "
        f"({m.num_key_value_heads} KV, head_dim {m.head_dim}), FFN {m.intermediate_size}{experts}, vocab {m.vocab_size}",
        f"  KV cache    {size(kv_token)} per token ({r.dtype.compute}, all layers, whole model)",
        "",
        "Weights by dtype (as the engine stores them: quantized dtypes keep embeddings and norms in bf16; GB = 1e9 bytes, GiB = 2^30 bytes)",
        table(
            ["dtype", "bytes/param", "GB", "GiB"],
            [
                [name, str(d.weight_bytes), gb(total_weight_bytes(m, d)), gib(total_weight_bytes(m, d))]
                for name, d in DTYPES.items()
            ],
        ),
        "",
        f"Tensor-parallel sizes 1..{m.num_attention_heads} (valid: {', '.join(map(str, plan.valid_tp_sizes))})",
        tp_table(plan),
        "",
        f"Memory per GPU by layout ({r.total_gpus} GPUs; the fullest GPU of each layout; "
        f"capacity {gib(plan.layouts[0].memory.capacity)})",
        memory_table(plan),
    ]
    if r.device.bandwidth_gbs:
        out += [
            "",
            f"Decode per step, batch {r.batch} per replica (upper bounds from {r.device.bandwidth_gbs:g} GB/s "
            f"memory bandwidth; comm = all-reduces per token; 'at full ctx' = {r.max_model_len} tokens of KV)",
            speed_table(plan),
        ]
    label = f"TP={rec.layout.tp} x PP={rec.layout.pp} x DP={rec.layout.dp}"
    out += ["", f"Recommended: {label}" + ("" if rec.fits else " (DOES NOT FIT)") + f" for {r.objective}"]
    out += [f"  - {sentence}" for sentence in rec.reasons]
    alternatives = [e.layout.label for e in plan.layouts[1:] if e.fits]
    if alternatives:
        out.append(
            "  Alternatives, best first: " + ", ".join(alternatives[:6]) + (" ..." if len(alternatives) > 6 else "")
        )
    if plan.warnings:
        out += ["", "Warnings"] + [f"  ! {w}" for w in plan.warnings]
    out += ["", "Assumptions"] + [f"  - {a}" for a in assumptions(plan)]
    return "\n".join(out)


def _weight_format(dtype) -> str:  # noqa: ANN001
    if dtype.quantization:
        return f"the engine's {dtype.quantization} projections, the rest in {dtype.compute}"
    return f"{dtype.weight_bytes:g} byte(s) per parameter"
