"""``tpinfer bench``: load, prefill and decode speed, memory and communication of one TP layout.

For each TP size, the calling process becomes rank 0 and starts the others (as ``tpinfer generate``
does), loads the model, warms up, then times ``repeat`` generations of ``batch_size`` random prompts
of ``input_len`` tokens and ``output_len`` new tokens (end-of-sequence ignored), reporting medians.
The roofline is this machine's own memory bandwidth, measured with the same processes and threads
(float32 GEMVs over a matrix larger than the caches, on every rank at once: torch's over ordinary pages and
the engine's own over huge pages, as the weights are held; the best of 7 repetitions of the faster method, as
STREAM reports), divided by the weight bytes one decode step reads.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from tpinfer.engine.bench import collect
from tpinfer.engine.launcher import Launcher
from tpinfer.engine.runtime import EngineSpec, RankEngine
from tpinfer.engine.sampling import SamplingParams
from tpinfer.parallel.shard import active_parameters


@dataclass
class BenchOptions:
    spec: EngineSpec
    batch_size: int = 1
    input_len: int = 32
    output_len: int = 128
    repeat: int = 3
    warmup_tokens: int = 8
    seed: int = 0


def weight_bytes_per_step(engine: RankEngine, batch: int = 1) -> int:
    """Parameter bytes one decode step of ``batch`` rows reads on this rank: all of them but the embedding table, of
    which a step reads one row per token (unless the table is also the LM head), and of a mixture-of-experts
    model's experts only the share ``batch`` tokens pick, 1 - (1 - k/E)^batch with uniform routing (the planner's
    expectation)."""
    total = engine.param_bytes
    embed = engine.model.model.embed_tokens  # None on a pipeline stage after the first
    if embed is not None and not engine.config.tie_word_embeddings:
        total -= embed.weight.numel() * embed.weight.element_size()
    config = engine.config
    if config.num_experts:
        experts = sum(p.numel() * p.element_size() for name, p in engine.model.named_parameters() if ".experts." in name)
        read = 1.0 - (1.0 - config.num_experts_per_tok / config.num_experts) ** batch
        total -= int(experts * (1.0 - read))
    return total


def reset_peak_rss() -> None:
    """Start this process's peak-RSS count afresh (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_one(options: BenchOptions, progress: bool = True) -> dict[str, Any]:
    spec = options.spec
    reset_peak_rss()  # rank 0 is this process; an earlier run of a sweep must not count
    launcher = Launcher(spec)
    engine = launcher.start(progress)
    try:
        return _measure(engine, options)
    except Exception as exc:
        launcher.raise_failure(exc)
        raise
    finally:
        launcher.shutdown(engine)


def _measure(engine: RankEngine, options: BenchOptions) -> dict[str, Any]:
    config, tp, pp = engine.config, engine.ctx.tp_size, engine.ctx.pp_size
    generator = torch.Generator().manual_seed(options.seed)
    vocab = min(config.vocab_size, 32000)
    prompts = [torch.randint(3, vocab, (options.input_len,), generator=generator).tolist()
               for _ in range(options.batch_size)]
    params = SamplingParams(max_new_tokens=options.output_len, temperature=0, ignore_eos=True)
    engine.run(prompts, replace(params, max_new_tokens=options.warmup_tokens))

    stats = engine.generator.stats
    prefill, decode = [], []
    for _ in range(options.repeat):
        before = (stats.prefill_s, stats.decode_s)
        engine.run(prompts, params)
        prefill.append(stats.prefill_s - before[0])
        decode.append(stats.decode_s - before[1])
    prefill_s, decode_s = statistics.median(prefill), statistics.median(decode)
    decode_tokens = options.batch_size * (options.output_len - 1)

    # One more run with collectives timed, for their count, bytes and share of the step.
    collect(engine, "stats", reset=True, timed=True)
    before = (stats.prefill_s, stats.decode_s)
    engine.run(prompts, params)
    timed_s = stats.prefill_s - before[0] + stats.decode_s - before[1]
    ranks = collect(engine, "stats", reset=True, timed=False, batch=options.batch_size)
    forwards = options.output_len
    comm = {k: v for k, v in ranks[0]["comm"].items() if not k.endswith("_object")}  # not the bench's own
    comm_s = sum(v["seconds"] for v in comm.values())

    bandwidth = collect(engine, "bandwidth")
    # Per method: the slowest rank of each repetition, the best repetition (as STREAM reports: a ceiling, not a
    # typical rate); the roofline is the fastest method.
    methods = {name: min(max(b["seconds"][name][i] for b in bandwidth) for i in range(len(times)))
               for name, times in bandwidth[0]["seconds"].items()}
    bandwidth_method = min(methods, key=methods.get)
    measured_bw = sum(b["bytes"] for b in bandwidth) / methods[bandwidth_method]
    step_bytes = sum(r["weight_bytes_per_step"] for r in ranks)  # every rank's share: all stages, all TP ranks
    # Waiting for another stage: receiving activations or logits, and the chosen tokens' broadcast from the last stage.
    decode_wait = [sum(r["pipe"].get(k, {}).get("seconds", 0.0) for k in ("pipe_wait", "pipe_broadcast")) for r in ranks]
    decode_tps = decode_tokens / decode_s
    latency = collect(engine, "all_reduce_latency", numel=config.hidden_size)[0] if tp > 1 else {}
    return {
        "model": engine.spec.model,
        "tp": tp,
        "pp": pp,
        "dtype": str(engine.model.dtype).removeprefix("torch."),
        "threads_per_rank": ranks[0]["threads"],
        "all_reduce_backend": ranks[0]["all_reduce_backend"],
        "native_kernels": all(r["native_kernels"] for r in ranks),
        "batch_size": options.batch_size,
        "input_len": options.input_len,
        "output_len": options.output_len,
        "load_s": engine.load_s,
        "ttft_s": prefill_s,
        "prefill_tokens_per_s": options.batch_size * options.input_len / prefill_s,
        "decode_tokens_per_s": decode_tps,
        "peak_rss_bytes": [r["peak_rss_bytes"] for r in ranks],
        "param_bytes": [r["param_bytes"] for r in ranks],
        "huge_page_bytes": [r["huge_page_bytes"] for r in ranks],
        "collectives_per_step": {k: v["calls"] / forwards for k, v in comm.items()},
        "collective_bytes_per_step": {k: v["bytes"] / forwards for k, v in comm.items()},
        "collective_share": comm_s / timed_s if timed_s else 0.0,
        "weight_bytes_per_step": step_bytes,
        "measured_bandwidth_gb_s": measured_bw / 1e9,
        "bandwidth_method": bandwidth_method,
        "bandwidth_by_method_gb_s": {k: sum(b["bytes"] for b in bandwidth) / v / 1e9 for k, v in methods.items()},
        "achieved_bandwidth_gb_s": step_bytes * decode_tps / options.batch_size / 1e9,
        "roofline_tokens_per_s": measured_bw / step_bytes * options.batch_size,
        "all_reduce_latency_us": latency,
        "quantization": quantization_name(engine),
        "bytes_per_weight": projection_bytes_per_weight(engine),
        "lm_head": next(r["lm_head"] for r in ranks if r["lm_head"] is not None),
        "moe": _moe_report(engine, ranks),
        # Pipeline stages: activations rank 0 sends per step, and each rank's share of the timed run spent waiting
        # for another stage (lockstep generation: one stage works at a time, so about 1 - 1/pp).
        "pipeline": None if pp == 1 else {
            "stage_of_rank": [r["stage"] for r in ranks],
            "activation_bytes_per_step": ranks[0]["pipe"].get("pipe_send", {}).get("bytes", 0) / forwards,
            "wait_share": [w / timed_s if timed_s else 0.0 for w in decode_wait],
        },
    }


def _moe_report(engine: RankEngine, ranks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A mixture-of-experts model: experts, top-k, the layout, the tokens each expert received in the timed run
    (summed over the MoE layers), and the busiest rank's share of that expert work: under ``--moe-parallel expert``
    the tokens its own experts took (1/tp when balanced), under ``tensor`` 1/tp (every rank shares every expert)."""
    config = engine.config
    if not config.num_experts:
        return None
    layers: dict[int, list[int]] = {}  # every stage's layers (a TP group's ranks count the same routing)
    for rank in ranks:
        for layer, counts in rank["expert_load"].items():
            layers.setdefault(layer, counts)
    load = [sum(counts) for counts in zip(*layers.values(), strict=True)]
    layout, tp = engine.spec.moe_parallel, engine.ctx.tp_size
    total = sum(load) or 1
    if layout == "expert" and tp > 1:
        per_rank = [sum(n for j, n in enumerate(load) if j * tp // config.num_experts == r) for r in range(tp)]
        busiest = max(per_rank) / total
    else:
        busiest = 1 / tp
    return {"experts": config.num_experts, "top_k": config.num_experts_per_tok, "layout": layout,
            "parameters": config.num_parameters, "active_parameters": active_parameters(config),
            "tokens_per_expert": load, "busiest_rank_share": busiest}


def quantization_name(engine: RankEngine) -> str | None:
    """The projections' format (``int4-g32-asym``, ...), or None when they are float."""
    from tpinfer.quant.layers import QuantLinear, QuantLMHead

    names = {m.scheme.name for m in engine.model.modules()
             if isinstance(m, QuantLinear) and not isinstance(m, QuantLMHead)}
    return ", ".join(sorted(names)) if names else None


def head_format(engine: RankEngine) -> str | None:
    """The LM head's format: its quantization scheme (``--quantize-lm-head``) or its float dtype."""
    from tpinfer.quant.layers import QuantLMHead

    head = engine.model.lm_head
    if head is None:  # a pipeline stage before the last
        return None
    return head.scheme.name if isinstance(head, QuantLMHead) else str(head.weight.dtype).removeprefix("torch.")


def projection_bytes_per_weight(engine: RankEngine) -> float:
    """Stored bytes per weight of this rank's projections (scales and offsets included; float ones at their
    dtype's size)."""
    from tpinfer.parallel.layers import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
    from tpinfer.quant.layers import QuantLinear, QuantLMHead

    stored = weights = 0
    for m in engine.model.modules():
        if isinstance(m, QuantLinear) and not isinstance(m, QuantLMHead):
            weights += m.out_features * m.in_features
            stored += sum(t.numel() * t.element_size() for t in m.quantized().values())
        elif isinstance(m, ColumnParallelLinear | RowParallelLinear | ReplicatedLinear):
            weights += m.weight.numel()
            stored += m.weight.numel() * m.weight.element_size()
    return stored / weights if weights else 0.0


def sweep(options: BenchOptions, sizes: list[int], progress: bool = True) -> list[dict[str, Any]]:
    results = []
    for tp in sizes:
        spec = replace(options.spec, tensor_parallel_size=tp)
        spec.check()
        results.append(run_one(replace(options, spec=spec), progress))
        time.sleep(0.2)
    return results


def table(results: list[dict[str, Any]]) -> str:
    """The seeds' table: TP size, tokens/s, memory per rank; plus what bounds it."""
    gib = 2**30
    lines = [
        f"{'TP':>3} {'threads':>7} {'decode tok/s':>12} {'roofline':>9} {'of roof':>7} {'prefill tok/s':>13} "
        f"{'TTFT ms':>8} {'params/rank':>12} {'peak RSS/rank':>13} {'comm share':>10} {'load s':>7}"
    ]
    for r in results:
        lines.append(
            f"{r['tp']:>3} {r['threads_per_rank']:>7} {r['decode_tokens_per_s']:>12.1f} {r['roofline_tokens_per_s']:>9.1f} "
            f"{100 * r['decode_tokens_per_s'] / r['roofline_tokens_per_s']:>6.0f}% {r['prefill_tokens_per_s']:>13.1f} "
            f"{1000 * r['ttft_s']:>8.1f} {max(r['param_bytes']) / gib:>10.2f}Gi {max(r['peak_rss_bytes']) / gib:>11.2f}Gi "
            f"{100 * r['collective_share']:>9.1f}% {r['load_s']:>7.2f}"
        )
    for r in results:
        if r["all_reduce_latency_us"]:
            lat = r["all_reduce_latency_us"]
            lines.append(f"tp={r['tp']}: all-reduce of a 1 x hidden float32 message: "
                         + ", ".join(f"{k} {v:.1f} us" for k, v in lat.items()))
        lines.append(f"tp={r['tp']}: collectives per step {', '.join(f'{k} {v:.0f}' for k, v in r['collectives_per_step'].items())}; "
                     f"bandwidth achieved {r['achieved_bandwidth_gb_s']:.1f} of measured {r['measured_bandwidth_gb_s']:.1f} GB/s; "
                     f"native decode kernels {'on' if r['native_kernels'] else 'off'}; "
                     f"weights in huge pages {_huge_pages(r)}")
        pipe = r.get("pipeline")
        if pipe:
            lines.append(f"tp={r['tp']} x pp={r['pp']}: stages of ranks {pipe['stage_of_rank']}; "
                         f"{pipe['activation_bytes_per_step'] / 1024:.1f} KiB of activations to the next stage per "
                         f"step; share of the run each rank waited for another stage (the bubble of lockstep "
                         f"generation): {', '.join(f'{100 * w:.0f}%' for w in pipe['wait_share'])}")
    return "\n".join(lines)


def _huge_pages(result: dict[str, Any]) -> str:
    """'x of y MiB' per rank: huge-page memory against the rank's parameter bytes ('n/a' where unreadable)."""
    pairs = zip(result["huge_page_bytes"], result["param_bytes"], strict=True)
    return ", ".join("n/a" if h is None else f"{h / 2**20:.0f} of {p / 2**20:.0f} MiB" for h, p in pairs)


def plot(results: list[dict[str, Any]], path: str) -> str:
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    tps = [r["tp"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(tps, [r["decode_tokens_per_s"] for r in results], "o-", label="decode (measured)")
    left.plot(tps, [r["roofline_tokens_per_s"] for r in results], "s--", label="bandwidth roofline")
    left.set_xlabel("tensor-parallel size")
    left.set_ylabel("tokens/s")
    left.set_xticks(tps)
    left.legend()
    left.set_title("decode speed")
    right.bar(tps, [max(r["param_bytes"]) / 2**20 for r in results], label="parameters")
    right.plot(tps, [max(r["peak_rss_bytes"]) / 2**20 for r in results], "ko-", label="peak RSS")
    right.set_xticks(tps)
    right.set_xlabel("tensor-parallel size")
    right.set_ylabel("MiB per rank")
    right.legend()
    right.set_title("memory per rank")
    fig.suptitle(f"{results[0]['model']} ({results[0]['dtype']}, batch {results[0]['batch_size']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
