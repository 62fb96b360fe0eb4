"""The native decode step as an adapter: it takes a built Llama-structured model and returns a step callable.

``native_decode(model)`` checks once what the fused kernels implement (this module owns those checks): a CPU rank
with the kernels built, q/k/v and gate/up local (column-parallel or replicated) and o/down row-parallel or
replicated, float or all quantized in one scheme the kernels take, head_dim within the attention kernel's buffer, one rope table for every step that rotates whole
heads, and no sliding window shorter than the context. If the model qualifies it returns a ``NativeDecode``; otherwise
None, and the engine calls the model's own forward. A ``NativeDecode`` runs decode steps (one new token per
row, up to ``NATIVE_MAX_ROWS`` rows, float32/bfloat16 activations) through the kernels and hands any other step
to the model: the model file stays the plain-torch reference these kernels are tested against.

With the shared-memory all-reduce, the whole decoder stack of a step is one native call (``kernels.DecodeStack``),
its all-reduces done in C; over gloo or NCCL, two native calls per layer with the all-reduces in between.
"""

from __future__ import annotations

import torch

from tpinfer import kernels
from tpinfer.engine.kv_cache import Batch, KVCache
from tpinfer.parallel.layers import (
    NATIVE_MAX_ROWS,
    QUANT_NATIVE_MAX_ROWS,
    ColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from tpinfer.parallel.spec import COLWISE, REPLICATE, ROWWISE
from tpinfer.quant.layers import QuantLinear

LOCAL = (ColumnParallelLinear, ReplicatedLinear)
REDUCED = (RowParallelLinear, ReplicatedLinear)


def _moe(layer):  # noqa: ANN001, ANN202  (MoEBlock | None)
    return getattr(layer, "moe", None)


def _mlp(layer) -> list:  # noqa: ANN001
    """The gated MLP's gate/up/down: the dense MLP's, a MoE layer's shared expert's, or none."""
    moe = _moe(layer)
    if moe is None:
        return [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    shared = moe.shared_expert
    return [] if shared is None else [shared["gate_proj"], shared["up_proj"], shared["down_proj"]]


def _projections(layer) -> list:  # noqa: ANN001
    attn = layer.self_attn
    return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, *_mlp(layer)]


def _local(m) -> bool:  # noqa: ANN001
    return isinstance(m, LOCAL) or (isinstance(m, QuantLinear) and m.mode in (COLWISE, REPLICATE))


def _reduced(m) -> bool:  # noqa: ANN001
    return isinstance(m, REDUCED) or (isinstance(m, QuantLinear) and m.mode in (ROWWISE, REPLICATE))


def _row_parallel(m) -> bool:  # noqa: ANN001
    return isinstance(m, RowParallelLinear) or (isinstance(m, QuantLinear) and m.mode == ROWWISE)


def model_reason(model: torch.nn.Module) -> str | None:
    """What keeps the kernels' attention from any layer of this model (device, library, scaling, rope, windows)."""
    if model.ctx.device.type != "cpu":
        return f"the kernels are CPU kernels; this rank runs on {model.ctx.device}"
    if not kernels.available():
        return kernels.unavailable_reason()
    if model.config.query_pre_attn_scalar is not None or model.config.attn_logit_softcapping is not None:
        return "the attention kernel scales by 1/sqrt(head_dim) and does not soft-cap"
    ropes = list(model.model.rotary_emb.values())
    if len(ropes) != 1 or not ropes[0].static or ropes[0].rotary_dim != model.config.head_dim:
        return "the kernels take one rope table that rotates whole heads"
    windows = [model.config.window(i) for i in range(model.config.num_hidden_layers)]
    if any(w is not None and w < model.max_seq_len for w in windows):
        return "a sliding window shorter than the context: the attention kernel attends every cached position"
    return None


def row_limit(weight: torch.Tensor, quantized: bool = False) -> int:
    """The most rows a step the kernels run may have (fewer for quantized weights); 0 where they cannot run."""
    if not kernels.usable(weight):
        return 0
    return (QUANT_NATIVE_MAX_ROWS if quantized else NATIVE_MAX_ROWS).get(weight.dtype, 0)


def takes_step(batch: Batch, weight: torch.Tensor, quantized: bool = False) -> bool:
    """A step the kernels run: one new token per row, few enough rows (``row_limit``), activations of ``weight``'s
    dtype."""
    return (batch.input_ids.shape[1] == 1 and not batch.all_logits
            and batch.input_ids.shape[0] <= row_limit(weight, quantized))


def check_in_cache(batch: Batch, cache: KVCache) -> None:
    """The kernels index the cache without bounds checks: check the step's slots and positions once."""
    if batch.kv_len > cache.max_seq_len or int(batch.slots.max()) >= cache.max_seqs:
        raise IndexError(f"decode step outside the KV cache: positions up to {batch.kv_len - 1} and slots up "
                         f"to {int(batch.slots.max())} for {cache.max_seqs} slots x {cache.max_seq_len}")


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the fused kernels cannot run this model's decode; None when they can."""
    reason = model_reason(model)
    if reason:
        return reason
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, _mlp(layer)
        if not all(_local(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, *mlp[:2])):
            return "q/k/v and gate/up must be column-parallel or replicated"
        if not all(_reduced(m) for m in (attn.o_proj, *mlp[2:])):
            return "o_proj and down_proj must be row-parallel or replicated"
        if hasattr(attn, "q_norm"):
            return "q/k norms: the attention kernel does not normalise heads"
        reason = _moe_reason(_moe(layer))
        if reason:
            return reason
        if attn.head_dim > kernels.MAX_HEAD_DIM:
            return f"head_dim {attn.head_dim} exceeds the attention kernel's {kernels.MAX_HEAD_DIM}"
        schemes = {m.scheme if isinstance(m, QuantLinear) else None for m in _projections(layer)}
        if len(schemes) > 1:
            return "a layer's projections must all be float or all share one quantization scheme"
        scheme = schemes.pop()
        if scheme is not None:
            for m in _projections(layer):
                probe = torch.empty(1, m.in_features, dtype=model.dtype)
                if not kernels.quant_usable(probe, scheme, m.quantized()):
                    return f"{scheme.name} with {m.in_features} input features is not one the kernels take"
    return None


def _moe_reason(moe) -> str | None:  # noqa: ANN001
    """What keeps the kernels from a MoE block (None for a dense layer, or a block they run)."""
    if moe is None:
        return None
    if moe.num_experts > kernels.MOE_MAX_EXPERTS or moe.top_k > kernels.MOE_MAX_TOP_K:
        return f"{moe.num_experts} experts, top {moe.top_k}: the MoE kernel takes up to {kernels.MOE_MAX_EXPERTS}, " \
               f"top {kernels.MOE_MAX_TOP_K}"
    linears = [moe.gate, *(m for e in moe.experts.values() for m in e.values())]
    if moe.shared_expert is not None:
        linears.append(moe.shared_expert_gate)
    if any(isinstance(m, QuantLinear) or m.bias is not None for m in linears):
        return "quantized or biased experts or router"
    if not isinstance(moe.gate, ReplicatedLinear) or (moe.shared_expert is not None
                                                      and not isinstance(moe.shared_expert_gate, ReplicatedLinear)):
        return "the router must be replicated"
    return None


def native_decode(model: torch.nn.Module) -> NativeDecode | None:
    """The fused decode step for ``model``, or None when the kernels cannot run it (see ``unsupported_reason``)."""
    return None if unsupported_reason(model) else NativeDecode(model)


class NativeDecode:
    """``model(batch, cache)`` with decode steps through the native kernels; every other step goes to the model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.ctx = model.ctx
        self.layers = model.model.layers
        self.indices = model.model.layers.indices  # global layer numbers: the KV cache's
        self.rope = next(iter(model.model.rotary_emb.values()))
        self.world_size = model.ctx.tp_size
        self.quantized = any(isinstance(m, QuantLinear) for m in _projections(self.layers[0]))
        self._described: dict[int, tuple[torch.Tensor, kernels.DecodeLayer]] = {}  # per layer, see _layer
        self._stack: tuple[torch.Tensor, kernels.DecodeStack] | None = None  # see stack

    def __call__(self, batch: Batch, cache: KVCache) -> torch.Tensor | None:
        """Local logits, as the model's forward returns them (None on a pipeline stage before the last)."""
        if not self.takes(batch):
            return self.model(batch, cache)
        hidden = self.decode(batch, cache)
        return None if hidden is None else self.model.logits(hidden)

    def takes(self, batch: Batch) -> bool:
        return takes_step(batch, self.layers[0].input_layernorm.weight, self.quantized)

    def max_rows(self) -> int:
        """The most rows of one new token each that ``takes`` accepts (0 where the kernels cannot run)."""
        return row_limit(self.layers[0].input_layernorm.weight, self.quantized)

    def decode(self, batch: Batch, cache: KVCache) -> torch.Tensor | None:
        """Final hidden states (B, hidden) of a decode step the kernels take (``takes``); on a pipeline stage before
        the last, None once its output is on its way to the next stage."""
        decoder = self.model.model
        if decoder.embed_tokens is not None:
            x = decoder.embed(batch.input_ids)
        else:  # a later pipeline stage: the previous stage's output (a fresh tensor the kernels update in place)
            x = self.ctx.pipe.recv_prev((batch.input_ids.shape[0], decoder.hidden_size), decoder.dtype)
        check_in_cache(batch, cache)
        cos, sin = self.rope.cos, self.rope.sin
        x = x.view(x.shape[0], -1)
        positions = batch.positions.view(-1)
        usable, group = self.ctx.comm.native_group(x.numel() * x.element_size())
        if usable:  # every layer in one native call, all-reduces included
            x, delta = self.stack(cache).run(x, cos, sin, batch.slots, positions, group, self._finish_half)
            self.ctx.comm.native_done()
        else:  # the sums go through gloo/NCCL: two native calls per layer, all-reduces in between
            delta = None
            for i, layer in zip(self.indices, self.layers, strict=True):
                described = self._layer(i, cache)
                partial = kernels.layer_attention(described, x, delta, cos, sin, batch.slots, positions)
                attn_out = layer.self_attn.o_proj.finish(partial)
                partial = kernels.layer_mlp(described, x, attn_out)
                delta = layer.mlp.down_proj.finish(partial) if _moe(layer) is None else self.ctx.comm.all_reduce(partial)
        if decoder.norm is None:  # the last layer's residual add, then on to the next stage
            self.ctx.pipe.send_next(x.add_(delta))
            return None
        return kernels.add_rms_norm(x, delta, decoder.norm.weight, decoder.norm.eps)[1]

    def stack(self, cache: KVCache) -> kernels.DecodeStack:
        """The whole stack described for ``cache``; the LM head is its tail (prefetched while the last all-reduce
        waits)."""
        if self._stack is None or self._stack[0] is not cache.keys[0]:  # a new cache: describe the layers again
            layers = [self._layer(i, cache) for i in self.indices]
            head = self.model.lm_head  # None before the last pipeline stage: nothing to prefetch
            tail = None if head is None else head.q if isinstance(head, QuantLinear) else head.weight
            self._stack = (cache.keys[0], kernels.DecodeStack(layers, tail))
        return self._stack[1]

    def _finish_half(self, half: int, out: torch.Tensor) -> None:
        """Half-layer ``half``'s all-reduce, left open by the native stack for a late peer, and its bias."""
        self.ctx.comm.finish_native(out)
        layer = self.layers[half // 2]  # position in this stage's stack
        bias = layer.self_attn.o_proj.bias if half % 2 == 0 else None if _moe(layer) is not None else layer.mlp.down_proj.bias
        if bias is not None:
            out.add_(bias)

    def _layer(self, i: int, cache: KVCache) -> kernels.DecodeLayer:
        """Layer ``i`` (global number) described for the kernels."""
        k_cache, v_cache = cache.keys[i], cache.values[i]
        described = self._described.get(i)
        if described is None or described[0] is not k_cache:  # a new cache (more slots): describe again
            layer = self.layers[self.indices.index(i)]
            attn, moe = layer.self_attn, _moe(layer)
            projections = _projections(layer)
            if len(projections) == 4:  # a MoE layer without a shared expert: g/u/d are unread, q stands in
                projections += [attn.q_proj] * 3
            modules = dict(zip("qkvogud", projections, strict=True))
            norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
            several = self.world_size > 1
            # A MoE layer's output is always a partial sum (of expert slices, or of this rank's experts).
            reduce = (several and _row_parallel(attn.o_proj), several and (moe is not None or _row_parallel(modules["d"])))
            scheme = attn.q_proj.scheme if isinstance(attn.q_proj, QuantLinear) else None
            quantized = {k: m.quantized() for k, m in modules.items()} if scheme is not None else None
            description = kernels.decode_layer(norm1.weight, norm2.weight, norm1.eps, norm2.eps,
                                               {k: (getattr(m, "weight", None), m.bias) for k, m in modules.items()},
                                               k_cache, v_cache, reduce, scheme, quantized)
            if moe is not None:
                experts = [moe.experts[str(e)] if str(e) in moe.experts else None for e in range(moe.num_experts)]
                kernels.describe_moe(description, moe.gate.weight,
                                     [None if e is None else tuple(e[n].weight for n in moe.names) for e in experts],
                                     moe.tokens_per_expert, moe.top_k, moe.norm_topk_prob, moe.router_dtype_weights,
                                     moe.shared_expert_gate.weight if moe.shared_expert is not None else None)
            self._described[i] = described = (k_cache, description)
        return described[1]
