"""Memory per rank for a TP x PP x DP layout: weights, KV cache, activation workspace, runtime overhead.

Formulas (each printed under "assumptions" by the report):

* weights: the bytes of the rank's parameters on its pipeline stage (``model.rank_bytes``: quantized projections
  in their formats);
* KV cache: batch x max_model_len x 2 (K and V) x local KV heads x head_dim x layers on the stage x
  compute bytes;
* activation workspace: one layer's live tensors for a forward over T = max(batch, min(max_model_len,
  2048)) tokens (chunked prefill, fused attention that never stores T x T scores), plus fp32 logits for
  the batch over the whole padded vocabulary;
* runtime overhead: the device's context (CUDA context and cuBLAS workspace, 1 GiB; 0.5 GiB for a CPU
  process) plus 0.5 GiB of NCCL buffers on a GPU when the replica has more than one rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpinfer.parallel import shard
from tpinfer.planner.dtypes import DType
from tpinfer.planner.hardware import Device
from tpinfer.planner.model import (
    ModelSpec,
    kv_bytes_per_token_per_layer,
    local_kv_heads,
    rank_bytes,
    split_layers,
    stage_elements,
)
from tpinfer.planner.units import GIB

PREFILL_CHUNK_TOKENS = 2048
COMM_BUFFERS_BYTES = GIB // 2
LOGITS_BYTES = 4  # logits are sampled in fp32


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int

    @property
    def model_parallel(self) -> int:
        """Ranks holding one copy of the model."""
        return self.tp * self.pp

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def label(self) -> str:
        return f"TP{self.tp}xPP{self.pp}xDP{self.dp}"


@dataclass(frozen=True)
class StageMemory:
    weights: int
    kv_cache: int
    activations: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.overhead


@dataclass(frozen=True)
class MemoryEstimate:
    stage_layers: tuple[int, ...]
    stages: tuple[StageMemory, ...]
    capacity: int  # bytes one rank may use
    kv_bytes_per_token: tuple[int, ...]  # per stage, one token on one rank

    @property
    def worst_stage(self) -> int:
        return max(range(len(self.stages)), key=lambda s: self.stages[s].total)

    @property
    def per_gpu(self) -> StageMemory:
        """The rank that needs the most memory: it decides whether the layout fits."""
        return self.stages[self.worst_stage]

    @property
    def fits(self) -> bool:
        return self.per_gpu.total <= self.capacity

    @property
    def kv_room(self) -> int:
        """Bytes left for KV cache on the tightest rank once weights, workspace and overhead are placed."""
        return min(self.capacity - s.weights - s.activations - s.overhead for s in self.stages)

    def max_sequences(self, max_model_len: int) -> int:
        """Sequences of ``max_model_len`` tokens whose KV cache fits on every rank of a replica."""
        per_sequence = [max_model_len * b for b in self.kv_bytes_per_token]
        room = [self.capacity - s.weights - s.activations - s.overhead for s in self.stages]
        return max(0, min(r // p if p else 0 for r, p in zip(room, per_sequence, strict=True)))


def rank_capacity(device: Device, gpus_per_node: int) -> int:
    """Memory one rank may use: a GPU's own, or its share of a CPU host's."""
    return device.memory_bytes // gpus_per_node if device.shared_host else device.memory_bytes


def activation_bytes(model: ModelSpec, tp: int, dtype: DType, max_model_len: int, batch: int) -> int:
    tokens = max(batch, min(max_model_len, PREFILL_CHUNK_TOKENS))
    hidden = model.hidden_size
    local_q = model.num_attention_heads // tp * model.head_dim
    local_kv = local_kv_heads(model, tp) * model.head_dim
    local_ffn = model.intermediate_size // tp
    # residual + normed input, q/k/v, attention output, o_proj partial sum, and the FFN's gate, up and product
    per_token = (
        2 * hidden + (local_q + 2 * local_kv) + local_q + hidden + 3 * local_ffn * max(1, model.num_experts_per_tok)
    )
    logits = batch * shard.padded_vocab_size(model.vocab_size, tp) * LOGITS_BYTES
    return tokens * per_token * dtype.compute_bytes + logits


def overhead_bytes(device: Device, layout: Layout) -> int:
    comm = COMM_BUFFERS_BYTES if layout.model_parallel > 1 and not device.shared_host else 0
    return int(device.context_gib * GIB) + comm


def estimate_memory(
    model: ModelSpec,
    layout: Layout,
    dtype: DType,
    device: Device,
    gpus_per_node: int,
    max_model_len: int,
    batch: int,
) -> MemoryEstimate:
    """Memory of every pipeline stage's ranks for ``layout`` serving ``batch`` sequences per replica."""
    layers = split_layers(model.num_hidden_layers, layout.pp)
    stored = rank_bytes(model, layout.tp, dtype)
    kv_layer = kv_bytes_per_token_per_layer(model, layout.tp, dtype.compute_bytes)
    workspace = activation_bytes(model, layout.tp, dtype, max_model_len, batch)
    overhead = overhead_bytes(device, layout)
    stages = tuple(
        StageMemory(
            weights=stage_elements(stored, layers, s),
            kv_cache=batch * max_model_len * kv_layer * layers[s],
            activations=workspace,
            overhead=overhead,
        )
        for s in range(layout.pp)
    )
    return MemoryEstimate(layers, stages, rank_capacity(device, gpus_per_node), tuple(kv_layer * n for n in layers))


def total_weight_bytes(model: ModelSpec, dtype: DType) -> int:
    """Bytes of the whole model's weights, unpadded (what one rank stores at tp=1)."""
    return rank_bytes(model, 1, dtype).total(model.num_hidden_layers)
