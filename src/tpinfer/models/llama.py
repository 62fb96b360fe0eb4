"""Llama-family decoders: llama, mistral, qwen2.

Pre-norm decoder layers, grouped-query attention with rotary embeddings, a SwiGLU MLP, RMSNorm. Mistral attends a
sliding window in every layer when ``sliding_window`` is set; qwen2 has q/k/v biases (none on o_proj) and, with
``use_sliding_window``, sliding layers from ``max_window_layers`` on. Module and parameter names equal HF
checkpoint names; the model knows about ranks only through the ParallelContext and the layers the plan gives it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tpinfer.config import FULL, SLIDING, decoder_fields, read_layer_types, read_rope
from tpinfer.engine.kv_cache import Batch, KVCache
from tpinfer.models.attention import cached_attention
from tpinfer.models.decoder import CausalLM, DecoderModel, build_linear
from tpinfer.models.family import VOCAB_PLAN, Family, decoder_layer_name
from tpinfer.models.rope import apply_rope
from tpinfer.parallel.layers import RMSNorm
from tpinfer.parallel.spec import COLWISE, ROWWISE, Linear, Module, Norm, Pair, decoder_features


def read_config(raw: dict[str, Any]) -> dict[str, Any]:
    fields = decoder_fields(raw)
    kind, layers = raw["model_type"], fields["num_hidden_layers"]
    if kind == "qwen2":
        fields["attention_bias"] = True  # qwen2 always has q/k/v biases (and none on o_proj) without a flag for it
        window, layer_types = qwen_sliding_layers(raw, layers)
    elif kind == "mistral":
        window = raw.get("sliding_window")
        layer_types = (SLIDING,) * layers if window else ()
    else:
        window, layer_types = None, ()  # HF's llama attends every position
    return {**fields, "layer_types": layer_types, "sliding_window": int(window) if window else None,
            "rope_parameters": read_rope(raw, layer_types)}


def qwen_sliding_layers(raw: dict[str, Any], layers: int) -> tuple[int | None, tuple[str, ...]]:
    """Qwen's ``use_sliding_window``: layers from ``max_window_layers`` on attend ``sliding_window`` positions."""
    window = raw.get("sliding_window") if raw.get("use_sliding_window") else None
    if not window:
        return None, ()
    start = int(raw.get("max_window_layers", layers))
    return int(window), read_layer_types(raw, layers, [SLIDING if i >= start else FULL for i in range(layers)])


def layer_modules(config, layer: int) -> dict[str, Module]:  # noqa: ANN001
    """One decoder layer's projections and norms."""
    name = lambda short: decoder_layer_name(layer, short)  # noqa: E731
    f = decoder_features(config)
    hidden, heads, kv_heads, ffn = f.hidden, f.heads, f.kv_heads, f.ffn
    qkv_bias = config.attention_bias
    o_bias = config.attention_bias and config.model_type not in ("qwen2", "qwen2_moe")
    mlp_bias = config.mlp_bias
    return {
        "self_attn.q_proj": Linear(name("self_attn.q_proj"), hidden, heads, qkv_bias),
        "self_attn.k_proj": Linear(name("self_attn.k_proj"), hidden, kv_heads, qkv_bias),
        "self_attn.v_proj": Linear(name("self_attn.v_proj"), hidden, kv_heads, qkv_bias),
        "self_attn.o_proj": Linear(name("self_attn.o_proj"), heads, hidden, o_bias),
        "mlp.gate_proj": Linear(name("mlp.gate_proj"), hidden, ffn, mlp_bias),
        "mlp.up_proj": Linear(name("mlp.up_proj"), hidden, ffn, mlp_bias),
        "mlp.down_proj": Linear(name("mlp.down_proj"), ffn, hidden, mlp_bias),
        "input_layernorm": Norm(name("input_layernorm"), config.hidden_size),
        "post_attention_layernorm": Norm(name("post_attention_layernorm"), config.hidden_size),
    }


AUTO_PLAN = {
    **VOCAB_PLAN,
    "model.layers.*.self_attn.q_proj": COLWISE,
    "model.layers.*.self_attn.k_proj": COLWISE,
    "model.layers.*.self_attn.v_proj": COLWISE,
    "model.layers.*.self_attn.o_proj": ROWWISE,
    "model.layers.*.mlp.gate_proj": COLWISE,
    "model.layers.*.mlp.up_proj": COLWISE,
    "model.layers.*.mlp.down_proj": ROWWISE,
}
PAIRS = (Pair(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj"),
         Pair(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"))


class LlamaAttention(nn.Module):
    def __init__(self, config, modules: dict[str, Module], layer: int, ctx, plan, dtype):  # noqa: ANN001
        super().__init__()
        self.layer, self.head_dim = layer, config.head_dim
        self.q_proj = build_linear(modules["self_attn.q_proj"], plan, ctx, dtype)
        self.k_proj = build_linear(modules["self_attn.k_proj"], plan, ctx, dtype)
        self.v_proj = build_linear(modules["self_attn.v_proj"], plan, ctx, dtype)
        self.o_proj = build_linear(modules["self_attn.o_proj"], plan, ctx, dtype)
        self.num_local_heads = sum(self.q_proj.part_sizes) // self.head_dim
        self.num_local_kv_heads = sum(self.k_proj.part_sizes) // self.head_dim

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: Batch,
                cache: KVCache) -> torch.Tensor:
        B, T = batch.input_ids.shape  # x may be this rank's chunk of the sequence (sequence parallelism)
        q = self.q_proj(x).view(B, T, self.num_local_heads, self.head_dim).transpose(1, 2)  # (B, H_local, T, D)
        k = self.k_proj(x).view(B, T, self.num_local_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_local_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = cached_attention(q, k, v, self.layer, cache, batch)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_local_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): gate/up column-parallel, down row-parallel."""

    def __init__(self, config, modules: dict[str, Module], ctx, plan, dtype):  # noqa: ANN001
        super().__init__()
        self.gate_proj = build_linear(modules["mlp.gate_proj"], plan, ctx, dtype)
        self.up_proj = build_linear(modules["mlp.up_proj"], plan, ctx, dtype)
        self.down_proj = build_linear(modules["mlp.down_proj"], plan, ctx, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """The pre-norm layer: x + attn(norm(x)), then the same around the MLP. Qwen3 and Phi-3 build it with their own
    attention and MLP classes and module declarations."""

    def __init__(self, config, layer: int, ctx, plan, dtype, attention: type = None, mlp: type = None,  # noqa: ANN001
                 modules: dict[str, Module] | None = None):
        super().__init__()
        modules = modules if modules is not None else layer_modules(config, layer)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, ctx.device)
        self.self_attn = (attention or LlamaAttention)(config, modules, layer, ctx, plan, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, ctx.device)
        self.mlp = (mlp or LlamaMLP)(config, modules, ctx, plan, dtype)

    def forward(self, x: torch.Tensor, rope, batch: Batch, cache: KVCache) -> torch.Tensor:  # noqa: ANN001
        h = x + self.self_attn(self.input_layernorm(x), rope, batch, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(CausalLM):
    def __init__(self, config, ctx, plan, dtype: torch.dtype, max_seq_len: int):  # noqa: ANN001
        model = DecoderModel(config, ctx, plan, dtype, max_seq_len,
                             lambda i: LlamaDecoderLayer(config, i, ctx, plan, dtype),
                             lambda size: RMSNorm(size, config.rms_norm_eps, dtype, ctx.device))
        super().__init__(config, ctx, plan, dtype, max_seq_len, model)


def _native_decode(model):  # noqa: ANN001, ANN202
    from tpinfer.kernels.decode_adapter import native_decode

    return native_decode(model)


FAMILY = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    read_config=read_config,
    layer=layer_modules,
    auto_plan=AUTO_PLAN,
    pairs=PAIRS,
    model=LlamaForCausalLM,
    decode_adapter=_native_decode,
)
