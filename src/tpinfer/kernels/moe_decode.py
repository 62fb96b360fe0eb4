"""Native decode for mixture-of-experts models: the kernels' attention half of each layer, the experts in Python.

``moe_native_decode(model)`` returns a step callable for a MoE model whose attention the fused kernels implement
(``decode_adapter.model_reason``, then per layer: float attention, q/k/v local and o reduced, no q/k norms, so
Qwen3-MoE is left to its torch forward), else None. Per layer of a decode step: ``kernels.layer_attention`` (residual add, norm, q/k/v, rope, cache,
attention, o_proj), o_proj's all-reduce, ``kernels.add_rms_norm``, then the MoE block (router, the chosen experts'
GEMVs through the native GEMV, one all-reduce). A dense layer among them (Qwen's ``mlp_only_layers``) runs the
kernels' MLP half. Every other step goes to the model.
"""

from __future__ import annotations

import torch

from tpinfer import kernels
from tpinfer.engine.kv_cache import Batch, KVCache
from tpinfer.kernels.decode_adapter import _local, _reduced, _row_parallel, check_in_cache, model_reason, takes_step
from tpinfer.quant.layers import QuantLinear


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the kernels cannot run this MoE model's attention at decode; None when they can."""
    if model.ctx.pp_size > 1:
        return "pipeline stages: the MoE decode adapter runs whole models only"
    reason = model_reason(model)
    if reason:
        return reason
    for layer in model.model.layers:
        attn = layer.self_attn
        if hasattr(attn, "q_norm"):
            return "q/k norms (Qwen3-MoE): the attention kernel does not normalise heads"
        if not all(_local(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)) or not _reduced(attn.o_proj):
            return "q/k/v must be column-parallel or replicated and o_proj row-parallel or replicated"
        if any(isinstance(m, QuantLinear) for m in (attn.q_proj, attn.o_proj)):
            return "quantized attention"
        if attn.head_dim > kernels.MAX_HEAD_DIM:
            return f"head_dim {attn.head_dim} exceeds the attention kernel's {kernels.MAX_HEAD_DIM}"
    return None


def moe_native_decode(model: torch.nn.Module) -> MoENativeDecode | None:
    return None if unsupported_reason(model) else MoENativeDecode(model)


class MoENativeDecode:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.ctx = model, model.ctx
        self.layers = model.model.layers
        self.indices = model.model.layers.indices
        self.rope = next(iter(model.model.rotary_emb.values()))
        self._described: dict[int, tuple[torch.Tensor, kernels.DecodeLayer]] = {}

    def __call__(self, batch: Batch, cache: KVCache) -> torch.Tensor:
        if not takes_step(batch, self.layers[0].input_layernorm.weight):
            return self.model(batch, cache)
        check_in_cache(batch, cache)
        decoder = self.model.model
        x = decoder.embed(batch.input_ids)
        x = x.view(x.shape[0], -1)
        cos, sin, positions = self.rope.cos, self.rope.sin, batch.positions.view(-1)
        delta = None
        for i, layer in zip(self.indices, self.layers, strict=True):
            described = self._layer(i, layer, cache)
            partial = kernels.layer_attention(described, x, delta, cos, sin, batch.slots, positions)
            attn_out = layer.self_attn.o_proj.finish(partial)
            if hasattr(layer, "moe"):
                norm = layer.post_attention_layernorm
                x, normed = kernels.add_rms_norm(x, attn_out, norm.weight, norm.eps)
                delta = layer.moe(normed)
            else:  # a dense layer: the kernels' MLP half
                delta = layer.mlp.down_proj.finish(kernels.layer_mlp(described, x, attn_out))
        norm = decoder.norm
        return self.model.logits(kernels.add_rms_norm(x, delta, norm.weight, norm.eps)[1])

    def _layer(self, i: int, layer, cache: KVCache) -> kernels.DecodeLayer:  # noqa: ANN001
        k_cache, v_cache = cache.keys[i], cache.values[i]
        described = self._described.get(i)
        if described is None or described[0] is not k_cache:
            attn = layer.self_attn
            mlp = getattr(layer, "mlp", None)
            dense = mlp is not None and hasattr(mlp, "gate_proj")
            # A MoE layer's MLP half never runs in the kernels: its g/u/d slots hold the q projection, unread.
            g, u, d = (mlp.gate_proj, mlp.up_proj, mlp.down_proj) if dense else (attn.q_proj,) * 3
            modules = dict(zip("qkvogud", (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, g, u, d), strict=True))
            norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
            several = self.ctx.tp_size > 1
            reduce = (several and _row_parallel(attn.o_proj), several and dense and _row_parallel(d))
            description = kernels.decode_layer(norm1.weight, norm2.weight, norm1.eps, norm2.eps,
                                               {k: (m.weight, m.bias) for k, m in modules.items()}, k_cache, v_cache,
                                               reduce)
            self._described[i] = described = (k_cache, description)
        return described[1]
