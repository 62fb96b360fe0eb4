"""Phi-3 (phi3): the Llama layer with fused projections in the checkpoint, and longrope.

``qkv_proj`` stores q, k and v one after another ([q | k | v] rows) and ``gate_up_proj`` stores gate then up. Each
rank reads its q heads, its KV heads and its FFN rows out of the fused tensors ("packed" sharding,
``tpinfer.parallel.spec.packed``), so the column-parallel layer holds [q_i | k_i | v_i] and splits its output by
those sizes. Rope may rotate only part of each head (``partial_rotary_factor``) and use longrope's short and long
factors (Phi-3 128k); ``sliding_window``, when set, applies to every layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tpinfer.config import SLIDING, decoder_fields, read_rope
from tpinfer.engine.kv_cache import Batch, KVCache
from tpinfer.models.attention import cached_attention
from tpinfer.models.decoder import CausalLM, DecoderModel, build_linear
from tpinfer.models.family import VOCAB_PLAN, Family, decoder_layer_name
from tpinfer.models.llama import LlamaDecoderLayer
from tpinfer.models.rope import apply_rope
from tpinfer.parallel.layers import RMSNorm
from tpinfer.parallel.spec import COLWISE, ROWWISE, Linear, Module, Norm, Pair, decoder_features, packed


def read_config(raw: dict[str, Any]) -> dict[str, Any]:
    fields = decoder_fields(raw)
    layers = fields["num_hidden_layers"]
    window = raw.get("sliding_window")
    layer_types = (SLIDING,) * layers if window else ()
    raw = dict(raw)
    scaling = raw.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("type", scaling.get("rope_type")) in ("su", "yarn"):
        raw["rope_scaling"] = {**scaling, "rope_type": "longrope"}  # HF's Phi-3 reads both old names as longrope
        raw["rope_scaling"].pop("type", None)
    # HF's Phi3Config keeps original_max_position_embeddings (default 4096) beside the rope dict, and it wins.
    rope = read_rope(raw, layer_types, original_max=int(raw.get("original_max_position_embeddings", 4096)),
                     partial_rotary=True)
    return {**fields, "layer_types": layer_types, "sliding_window": int(window) if window else None,
            "rope_parameters": rope}


def layer_modules(config, layer: int) -> dict[str, Module]:  # noqa: ANN001
    name = lambda short: decoder_layer_name(layer, short)  # noqa: E731
    f = decoder_features(config)
    hidden, heads, kv_heads, ffn = f.hidden, f.heads, f.kv_heads, f.ffn
    return {
        "self_attn.qkv_proj": Linear(name("self_attn.qkv_proj"), hidden, packed(heads, kv_heads, kv_heads)),
        "self_attn.o_proj": Linear(name("self_attn.o_proj"), heads, hidden),
        "mlp.gate_up_proj": Linear(name("mlp.gate_up_proj"), hidden, packed(ffn, ffn)),
        "mlp.down_proj": Linear(name("mlp.down_proj"), ffn, hidden),
        "input_layernorm": Norm(name("input_layernorm"), config.hidden_size),
        "post_attention_layernorm": Norm(name("post_attention_layernorm"), config.hidden_size),
    }


AUTO_PLAN = {
    **VOCAB_PLAN,
    "model.layers.*.self_attn.qkv_proj": COLWISE,
    "model.layers.*.self_attn.o_proj": ROWWISE,
    "model.layers.*.mlp.gate_up_proj": COLWISE,
    "model.layers.*.mlp.down_proj": ROWWISE,
}
PAIRS = (Pair(("self_attn.qkv_proj",), "self_attn.o_proj"), Pair(("mlp.gate_up_proj",), "mlp.down_proj"))


class Phi3Attention(nn.Module):
    def __init__(self, config, modules: dict[str, Module], layer: int, ctx, plan, dtype):  # noqa: ANN001
        super().__init__()
        self.layer, self.head_dim = layer, config.head_dim
        self.qkv_proj = build_linear(modules["self_attn.qkv_proj"], plan, ctx, dtype)
        self.o_proj = build_linear(modules["self_attn.o_proj"], plan, ctx, dtype)
        self.sizes = self.qkv_proj.part_sizes  # this rank's q, k and v features
        self.num_local_heads = self.sizes[0] // self.head_dim
        self.num_local_kv_heads = self.sizes[1] // self.head_dim

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: Batch,
                cache: KVCache) -> torch.Tensor:
        B, T = batch.input_ids.shape  # x may be this rank's chunk of the sequence (sequence parallelism)
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = q.reshape(B, T, self.num_local_heads, self.head_dim).transpose(1, 2)  # (B, H_local, T, D)
        k = k.reshape(B, T, self.num_local_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(B, T, self.num_local_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = cached_attention(q, k, v, self.layer, cache, batch)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_local_heads * self.head_dim))


class Phi3MLP(nn.Module):
    """down(up * silu(gate)) with [gate | up] from one fused projection."""

    def __init__(self, config, modules: dict[str, Module], ctx, plan, dtype):  # noqa: ANN001
        super().__init__()
        self.gate_up_proj = build_linear(modules["mlp.gate_up_proj"], plan, ctx, dtype)
        self.down_proj = build_linear(modules["mlp.down_proj"], plan, ctx, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.gate_up_proj.part_sizes, dim=-1)
        return self.down_proj(up * F.silu(gate))


class Phi3ForCausalLM(CausalLM):
    def __init__(self, config, ctx, plan, dtype: torch.dtype, max_seq_len: int):  # noqa: ANN001
        model = DecoderModel(config, ctx, plan, dtype, max_seq_len,
                             lambda i: LlamaDecoderLayer(config, i, ctx, plan, dtype, attention=Phi3Attention,
                                                         mlp=Phi3MLP, modules=layer_modules(config, i)),
                             lambda size: RMSNorm(size, config.rms_norm_eps, dtype, ctx.device))
        super().__init__(config, ctx, plan, dtype, max_seq_len, model)
        # HF's Phi-3 recomputes a sequence's cache once, when it first grows past the original length: from then on
        # every position, the prompt's included, is rotated with the long factors.
        rope = model.rotary_emb["full_attention" if "full_attention" in model.rotary_emb else "sliding_attention"]
        if rope.long is not None:
            self.recompute_length = rope.original + 1


FAMILY = Family(
    name="phi3",
    model_types=("phi3",),
    read_config=read_config,
    layer=layer_modules,
    auto_plan=AUTO_PLAN,
    pairs=PAIRS,
    model=Phi3ForCausalLM,
)
