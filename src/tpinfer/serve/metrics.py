"""Server metrics in Prometheus' text format (GET /metrics), without a client library.

Counters and histograms are written by the event loop (requests) and the engine thread (tokens,
latencies); a lock keeps each histogram's buckets, sum and count consistent with each other.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
OUTCOMES = ("success", "invalid", "unauthorized", "rejected", "cancelled", "error")


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip((*self.buckets, "+Inf"), self.counts, strict=True):
            cumulative += count
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self, tensor_parallel_size: int, max_num_seqs: int, kv_cache_bytes: int) -> None:
        self.tensor_parallel_size = tensor_parallel_size
        self.max_num_seqs, self.kv_cache_bytes = max_num_seqs, kv_cache_bytes
        self.requests: Counter[str] = Counter({outcome: 0 for outcome in OUTCOMES})
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.per_token = Histogram(PER_TOKEN_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.queue_depth: Callable[[], int] = lambda: 0
        self.running: Callable[[], int] = lambda: 0
        # Pipeline stages (pp > 1): rank 0's view, read when rendered. Bubble: seconds rank 0 waited for a
        # micro-batch's logits with nothing else to start; traffic: bytes rank 0 sent to / received from other stages.
        self.pipeline_parallel_size = 1
        self.bubble_seconds: Callable[[], float] = lambda: 0.0
        self.busy_seconds: Callable[[], float] = lambda: 0.0
        self.step_phases: Callable[[], dict[str, float]] = dict  # seconds of rank 0's steps by phase (Scheduler)
        self.prefill_tokens: Callable[[], int] = lambda: 0
        self.folded_steps: Callable[[], int] = lambda: 0
        # Prefix caching: whether it is on, prompt tokens looked up, and of them those found cached.
        self.prefix_caching = False
        self.prefix_cache: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self.pipe_bytes: Callable[[], dict[str, int]] = dict
        # Data-parallel replicas: per replica {"running", "waiting", "steps", "generated_tokens"}.
        self.replicas: Callable[[], list[dict[str, int]]] = list
        # Mixture of experts: MoE layer -> tokens routed to each expert so far (rank 0's replica).
        self.expert_load: Callable[[], dict[int, list[int]]] = dict
        self._lock = threading.Lock()

    def request(self, outcome: str) -> None:
        with self._lock:
            self.requests[outcome] += 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.generation_tokens += 1
            self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        with self._lock:
            self.generation_tokens += 1
            self.per_token.observe(seconds)

    def finished(self, prompt_tokens: int, seconds: float) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.latency.observe(seconds)

    def render(self) -> str:
        replicas = list(enumerate(self.replicas()))
        experts = [(layer, e, n) for layer, counts in sorted(self.expert_load().items()) for e, n in enumerate(counts)]
        phases = self.step_phases()
        queries, hits = self.prefix_cache()
        with self._lock:
            lines = [
                "# HELP tpinfer_requests_total Completion and chat requests by outcome.",
                "# TYPE tpinfer_requests_total counter",
                *(f'tpinfer_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(self.requests.items())),
                "# HELP tpinfer_prompt_tokens_total Prompt tokens of finished requests.",
                "# TYPE tpinfer_prompt_tokens_total counter",
                f"tpinfer_prompt_tokens_total {self.prompt_tokens}",
                "# HELP tpinfer_generation_tokens_total Generated tokens.",
                "# TYPE tpinfer_generation_tokens_total counter",
                f"tpinfer_generation_tokens_total {self.generation_tokens}",
                "# HELP tpinfer_num_requests_waiting Sequences waiting for a KV-cache slot.",
                "# TYPE tpinfer_num_requests_waiting gauge",
                f"tpinfer_num_requests_waiting {self.queue_depth()}",
                "# HELP tpinfer_num_requests_running Sequences in the running batch.",
                "# TYPE tpinfer_num_requests_running gauge",
                f"tpinfer_num_requests_running {self.running()}",
                "# HELP tpinfer_max_num_seqs KV-cache slots (the largest running batch).",
                "# TYPE tpinfer_max_num_seqs gauge",
                f"tpinfer_max_num_seqs {self.max_num_seqs}",
                "# HELP tpinfer_kv_cache_bytes KV-cache memory per rank.",
                "# TYPE tpinfer_kv_cache_bytes gauge",
                f"tpinfer_kv_cache_bytes {self.kv_cache_bytes}",
                "# HELP tpinfer_tensor_parallel_size Ranks the model is sharded over.",
                "# TYPE tpinfer_tensor_parallel_size gauge",
                f"tpinfer_tensor_parallel_size {self.tensor_parallel_size}",
                "# HELP tpinfer_pipeline_parallel_size Pipeline stages of the model.",
                "# TYPE tpinfer_pipeline_parallel_size gauge",
                f"tpinfer_pipeline_parallel_size {self.pipeline_parallel_size}",
                "# HELP tpinfer_step_seconds_total Seconds rank 0's engine thread spent in each phase of its steps: "
                "schedule (admit, build and send the step), prefill and decode (the forwards), sample (sampling, "
                "detokenizing, stop strings, streaming). One-stage layouts.",
                "# TYPE tpinfer_step_seconds_total counter",
                *(f'tpinfer_step_seconds_total{{phase="{k}"}} {v:.6f}' for k, v in phases.items()),
                "# HELP tpinfer_prefill_tokens_total Prompt tokens prefilled (computed), right-padding included "
                "where prompts are padded rather than packed.",
                "# TYPE tpinfer_prefill_tokens_total counter",
                f"tpinfer_prefill_tokens_total {self.prefill_tokens()}",
                "# HELP tpinfer_folded_prefill_steps_total Steps whose prompt tokens ran in the decode forward, a row "
                "each, instead of a forward of their own.",
                "# TYPE tpinfer_folded_prefill_steps_total counter",
                f"tpinfer_folded_prefill_steps_total {self.folded_steps()}",
                "# HELP tpinfer_prefix_caching Whether prompts start from cached prefixes (1) or not (0).",
                "# TYPE tpinfer_prefix_caching gauge",
                f"tpinfer_prefix_caching {int(self.prefix_caching)}",
                "# HELP tpinfer_prefix_cache_queries_total Prompt tokens of admitted requests looked up in the "
                "prefix cache.",
                "# TYPE tpinfer_prefix_cache_queries_total counter",
                f"tpinfer_prefix_cache_queries_total {queries}",
                "# HELP tpinfer_prefix_cache_hits_total Of them, tokens whose keys and values were reused, not "
                "computed.",
                "# TYPE tpinfer_prefix_cache_hits_total counter",
                f"tpinfer_prefix_cache_hits_total {hits}",
                "# HELP tpinfer_pipeline_busy_seconds_total Seconds the engine thread spent running steps.",
                "# TYPE tpinfer_pipeline_busy_seconds_total counter",
                f"tpinfer_pipeline_busy_seconds_total {self.busy_seconds():.6f}",
                "# HELP tpinfer_pipeline_bubble_seconds_total Of those, seconds rank 0 (stage 0) waited for the last "
                "stage with no micro-batch to start.",
                "# TYPE tpinfer_pipeline_bubble_seconds_total counter",
                f"tpinfer_pipeline_bubble_seconds_total {self.bubble_seconds():.6f}",
                "# HELP tpinfer_pipeline_bytes_total Stage-to-stage bytes rank 0 sent (activations) and received "
                "(logits).",
                "# TYPE tpinfer_pipeline_bytes_total counter",
                *(f'tpinfer_pipeline_bytes_total{{direction="{d}"}} {n}' for d, n in sorted(self.pipe_bytes().items())),
                "# HELP tpinfer_replica_requests_running Sequences in each data-parallel replica's running batch.",
                "# TYPE tpinfer_replica_requests_running gauge",
                *(f'tpinfer_replica_requests_running{{replica="{d}"}} {r["running"]}' for d, r in replicas),
                "# HELP tpinfer_replica_requests_waiting Sequences waiting for a slot of each replica.",
                "# TYPE tpinfer_replica_requests_waiting gauge",
                *(f'tpinfer_replica_requests_waiting{{replica="{d}"}} {r["waiting"]}' for d, r in replicas),
                "# HELP tpinfer_replica_generation_tokens_total Tokens each replica generated.",
                "# TYPE tpinfer_replica_generation_tokens_total counter",
                *(f'tpinfer_replica_generation_tokens_total{{replica="{d}"}} {r["generated_tokens"]}'
                  for d, r in replicas),
                "# HELP tpinfer_replica_steps_total Steps (micro-batches) each replica ran.",
                "# TYPE tpinfer_replica_steps_total counter",
                *(f'tpinfer_replica_steps_total{{replica="{d}"}} {r["steps"]}' for d, r in replicas),
                "# HELP tpinfer_expert_tokens_total Tokens routed to each expert of each mixture-of-experts layer.",
                "# TYPE tpinfer_expert_tokens_total counter",
                *(f'tpinfer_expert_tokens_total{{layer="{layer}",expert="{e}"}} {n}' for layer, e, n in experts),
                "# HELP tpinfer_time_to_first_token_seconds From arrival to the first generated token.",
                "# TYPE tpinfer_time_to_first_token_seconds histogram",
                *self.ttft.lines("tpinfer_time_to_first_token_seconds"),
                "# HELP tpinfer_time_per_output_token_seconds Between two generated tokens of a sequence.",
                "# TYPE tpinfer_time_per_output_token_seconds histogram",
                *self.per_token.lines("tpinfer_time_per_output_token_seconds"),
                "# HELP tpinfer_request_latency_seconds From arrival to the last token of a request.",
                "# TYPE tpinfer_request_latency_seconds histogram",
                *self.latency.lines("tpinfer_request_latency_seconds"),
            ]
        return "\n".join(lines) + "\n"
