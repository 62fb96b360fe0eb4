"""Communication per generated token and the decode step time, from a latency + bandwidth model.

One decode step of a replica runs ``batch`` tokens through every layer. Under tensor parallelism each
decoder layer ends its attention and its FFN with an all-reduce of a (batch, hidden) activation (the
seeds' "2 all-reduces per layer"); the vocabulary-parallel embedding adds one more and the logits are
all-gathered once. Pipeline stages pass a (batch, hidden) activation to the next stage.

* all-reduce of S bytes over n ranks (ring): latency + 2 (n - 1) x (hop + S / n / bandwidth)
* all-gather of S bytes in total:             latency + (n - 1) x (hop + S / n / bandwidth)
* point-to-point send of S bytes:             latency + hop + S / bandwidth

Decode reads every weight and the KV cache once per step, so a rank's memory time is bytes / memory
bandwidth. The step is the sum over stages of memory time and all-reduces, plus the stage-to-stage sends;
compute is not modelled (decode is memory-bound), which makes tokens/s an upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpinfer.parallel import shard
from tpinfer.parallel.mesh import Mesh
from tpinfer.planner.dtypes import DType
from tpinfer.planner.hardware import Device, Link
from tpinfer.planner.memory import Layout, MemoryEstimate
from tpinfer.planner.model import ModelSpec, expert_fraction_read, rank_bytes
from tpinfer.planner.units import GB


@dataclass(frozen=True)
class Placement:
    """Ranks are placed TP innermost, then DP, then PP: a stage's replicas fill whole nodes first."""

    tp_crosses_nodes: bool
    boundary_crosses_nodes: tuple[bool, ...]  # one per stage boundary


def placement(layout: Layout, gpus_per_node: int) -> Placement:
    mesh = Mesh(layout.tp, layout.pp, layout.dp)

    def node(stage: int, replica: int, tp_rank: int) -> int:
        return mesh.rank(stage, replica, tp_rank) // gpus_per_node

    tp_crosses = any(node(s, d, 0) != node(s, d, layout.tp - 1) for s in range(layout.pp) for d in range(layout.dp))
    boundaries = tuple(
        any(node(s, d, i) != node(s + 1, d, i) for d in range(layout.dp) for i in range(layout.tp))
        for s in range(layout.pp - 1)
    )
    return Placement(tp_crosses, boundaries)


def tp_all_reduces(layers: int, tp: int, first_stage: bool = True) -> int:
    """All-reduces one decode step issues over a TP group of ``tp`` ranks running ``layers`` decoder layers: every
    layer's attention output and FFN output are partial sums over the ranks (a mixture-of-experts block's too, in
    either expert layout: one all-reduce sums the experts' parts), and the first stage's vocabulary-parallel
    embedding is one more. Zero at tp=1."""
    if tp == 1:
        return 0
    return 2 * layers + (1 if first_stage else 0)


def all_reduce_seconds(message_bytes: int, ranks: int, link: Link) -> float:
    if ranks == 1:
        return 0.0
    steps = 2 * (ranks - 1)
    return (link.latency_us + steps * link.hop_us) * 1e-6 + steps * message_bytes / ranks / (link.bandwidth_gbs * GB)


def all_gather_seconds(total_bytes: int, ranks: int, link: Link) -> float:
    if ranks == 1:
        return 0.0
    steps = ranks - 1
    return (link.latency_us + steps * link.hop_us) * 1e-6 + steps * total_bytes / ranks / (link.bandwidth_gbs * GB)


def send_seconds(message_bytes: int, link: Link) -> float:
    return (link.latency_us + link.hop_us) * 1e-6 + message_bytes / (link.bandwidth_gbs * GB)


@dataclass(frozen=True)
class StepEstimate:
    """One decode step of one replica: ``batch`` new tokens at ``context`` tokens of KV cache each."""

    batch: int
    context: int
    all_reduces: int  # per step, all stages together
    message_bytes: int  # one all-reduce
    all_reduce_s: float  # one all-reduce
    tp_link: str
    memory_s: float
    tp_comm_s: float
    pp_comm_s: float

    @property
    def comm_s(self) -> float:
        return self.tp_comm_s + self.pp_comm_s

    @property
    def step_s(self) -> float:
        return self.memory_s + self.comm_s

    @property
    def comm_share(self) -> float:
        return self.comm_s / self.step_s if self.step_s else 0.0

    @property
    def tokens_per_s_per_sequence(self) -> float:
        return 1.0 / self.step_s if self.step_s else 0.0


def rank_bandwidth(device: Device, gpus_per_node: int) -> float | None:
    """Memory bandwidth one rank gets, bytes/s: a GPU's own, or its share of a CPU host's."""
    if device.bandwidth_gbs is None:
        return None
    share = gpus_per_node if device.shared_host else 1
    return device.bandwidth_gbs * GB / share


def estimate_step(
    model: ModelSpec,
    layout: Layout,
    memory: MemoryEstimate,
    dtype: DType,
    device: Device,
    gpus_per_node: int,
    intra: Link,
    network: Link,
    batch: int,
    context: int,
) -> StepEstimate | None:
    """The decode step for ``batch`` sequences of ``context`` tokens; None when the bandwidth is unknown."""
    bandwidth = rank_bandwidth(device, gpus_per_node)
    if bandwidth is None:
        return None
    where = placement(layout, gpus_per_node)
    tp_link = network if where.tp_crosses_nodes else intra
    message = batch * model.hidden_size * dtype.compute_bytes
    one_all_reduce = all_reduce_seconds(message, layout.tp, tp_link)
    logits = batch * shard.padded_vocab_size(model.vocab_size, layout.tp) * dtype.compute_bytes
    # Experts no token of the batch routes to are not read (MoE); dense models read every weight.
    unread_experts = rank_bytes(model, layout.tp, dtype).experts * (1 - expert_fraction_read(model, batch))
    memory_s = tp_s = 0.0
    all_reduces = 0
    last = layout.pp - 1
    for s, stage in enumerate(memory.stages):
        kv_read = batch * context * memory.kv_bytes_per_token[s]
        weights_read = stage.weights - memory.stage_layers[s] * unread_experts
        memory_s += (weights_read + kv_read) / bandwidth
        count = tp_all_reduces(memory.stage_layers[s], layout.tp, first_stage=s == 0)
        all_reduces += count
        tp_s += count * one_all_reduce
        if s == last:
            tp_s += all_gather_seconds(logits, layout.tp, tp_link)  # each rank holds a slice of the logits
    pp_s = sum(send_seconds(message, network if crosses else intra) for crosses in where.boundary_crosses_nodes)
    return StepEstimate(batch, context, all_reduces, message, one_all_reduce, tp_link.name, memory_s, tp_s, pp_s)
