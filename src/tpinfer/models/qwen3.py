"""Qwen3: the Llama layer with an RMSNorm on every query and key head before rope (``q_norm``, ``k_norm``).

Those norms act on one head's ``head_dim`` features, so they are replicated: each rank normalises its own heads.
Biases follow ``attention_bias`` (q, k, v and o alike); ``use_sliding_window`` works as in qwen2.
"""

from __future__ import annotations

from typing import Any

import torch

from tpinfer.config import decoder_fields, read_rope
from tpinfer.engine.kv_cache import Batch, KVCache
from tpinfer.models.attention import cached_attention
from tpinfer.models.decoder import CausalLM, DecoderModel
from tpinfer.models.family import Family, decoder_layer_name
from tpinfer.models.llama import AUTO_PLAN, PAIRS, LlamaAttention, LlamaDecoderLayer, qwen_sliding_layers
from tpinfer.models.llama import layer_modules as llama_layer_modules
from tpinfer.models.rope import apply_rope
from tpinfer.parallel.layers import RMSNorm
from tpinfer.parallel.spec import Module, Norm


def read_config(raw: dict[str, Any]) -> dict[str, Any]:
    fields = decoder_fields(raw)
    window, layer_types = qwen_sliding_layers(raw, fields["num_hidden_layers"])
    return {**fields, "layer_types": layer_types, "sliding_window": window,
            "rope_parameters": read_rope(raw, layer_types)}


def layer_modules(config, layer: int) -> dict[str, Module]:  # noqa: ANN001
    return {**llama_layer_modules(config, layer),
            "self_attn.q_norm": Norm(decoder_layer_name(layer, "self_attn.q_norm"), config.head_dim),
            "self_attn.k_norm": Norm(decoder_layer_name(layer, "self_attn.k_norm"), config.head_dim)}


class Qwen3Attention(LlamaAttention):
    def __init__(self, config, modules: dict[str, Module], layer: int, ctx, plan, dtype):  # noqa: ANN001
        super().__init__(config, modules, layer, ctx, plan, dtype)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype, ctx.device)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype, ctx.device)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: Batch,
                cache: KVCache) -> torch.Tensor:
        B, T = batch.input_ids.shape  # x may be this rank's chunk of the sequence (sequence parallelism)
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_local_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_local_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_local_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv_local, T, D)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = cached_attention(q, k, v, self.layer, cache, batch)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_local_heads * self.head_dim))


class Qwen3ForCausalLM(CausalLM):
    def __init__(self, config, ctx, plan, dtype: torch.dtype, max_seq_len: int):  # noqa: ANN001
        model = DecoderModel(config, ctx, plan, dtype, max_seq_len,
                             lambda i: LlamaDecoderLayer(config, i, ctx, plan, dtype, attention=Qwen3Attention,
                                                         modules=layer_modules(config, i)),
                             lambda size: RMSNorm(size, config.rms_norm_eps, dtype, ctx.device))
        super().__init__(config, ctx, plan, dtype, max_seq_len, model)


FAMILY = Family(
    name="qwen3",
    model_types=("qwen3",),
    read_config=read_config,
    layer=layer_modules,
    auto_plan=AUTO_PLAN,
    pairs=PAIRS,
    model=Qwen3ForCausalLM,
)
