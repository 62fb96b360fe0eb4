"""Gemma 2 and Gemma 3 (text): gemma2, gemma3_text.

What sets them apart from Llama, all as HF computes it:

* RMSNorm scales by (1 + w), computed in float32 and rounded once; four norms per layer (before and after attention,
  before and after the MLP), so a layer is x + post(attn(pre(x))), then the same around the MLP;
* a GELU (tanh approximation) gated MLP; the embedding output multiplied by sqrt(hidden_size);
* attention scaled by ``query_pre_attn_scalar ** -0.5``; Gemma 2 soft-caps the scores (``attn_logit_softcapping``)
  and both may soft-cap the final logits (``final_logit_softcapping``);
* interleaved sliding-window and global layers (``layer_types``; Gemma 2 alternates, Gemma 3 has one global layer
  in six), each type with its own rope (Gemma 3: theta 10k locally, 1M with optional scaling globally);
* Gemma 3 normalises every query and key head (``q_norm``, ``k_norm``, also (1 + w)) before rope.

Small Gemmas have a single KV head; at TP > 1 it is replicated on every rank (``Units.replicable``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tpinfer.config import FULL, SLIDING, ConfigError, decoder_fields, read_layer_types, read_rope
from tpinfer.engine.kv_cache import Batch, KVCache
from tpinfer.models.attention import cached_attention
from tpinfer.models.decoder import CausalLM, DecoderModel, build_linear
from tpinfer.models.family import Family, decoder_layer_name
from tpinfer.models.llama import AUTO_PLAN, PAIRS, LlamaAttention
from tpinfer.models.rope import apply_rope
from tpinfer.parallel.layers import ParallelModule
from tpinfer.parallel.spec import Linear, Module, Norm, decoder_features

ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}  # HF name -> F.gelu's approximate=


def read_config(raw: dict[str, Any]) -> dict[str, Any]:
    gemma3 = raw["model_type"] == "gemma3_text"
    # HF's Gemma configs default head_dim to 256 and tie the embeddings unless told otherwise.
    fields = decoder_fields(raw, head_dim=raw.get("head_dim") or 256, hidden_act_key="hidden_activation",
                            supported_acts=tuple(ACTIVATIONS))
    fields["tie_word_embeddings"] = bool(raw.get("tie_word_embeddings", True))
    layers = fields["num_hidden_layers"]
    pattern = int(raw.get("sliding_window_pattern", 6)) if gemma3 else 2
    default = [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
    layer_types = read_layer_types(raw, layers, default)
    window = raw.get("sliding_window", 4096)
    if layer_types and not window:
        raise ConfigError("sliding_window is null but layer_types has sliding_attention layers")
    if gemma3:
        rope = read_rope(raw, layer_types or (FULL,), default_theta=1_000_000.0,
                         local_theta=float(raw.get("rope_local_base_freq", 10_000.0)))
    else:
        rope = read_rope(raw, layer_types or (FULL,))
    return {
        **fields,
        "layer_types": layer_types,
        "sliding_window": int(window) if layer_types else None,
        "rope_parameters": rope,
        "query_pre_attn_scalar": float(raw.get("query_pre_attn_scalar", 256)),
        # Gemma 3 carries attn_logit_softcapping in its config but HF's attention does not apply it.
        "attn_logit_softcapping": None if gemma3 else raw.get("attn_logit_softcapping", 50.0),
        "final_logit_softcapping": raw.get("final_logit_softcapping", None if gemma3 else 30.0),
    }


def layer_modules(config, layer: int) -> dict[str, Module]:  # noqa: ANN001
    name = lambda short: decoder_layer_name(layer, short)  # noqa: E731
    f = decoder_features(config)
    hidden, heads, kv_heads, ffn = f.hidden, f.heads, f.kv_heads, f.ffn
    bias = config.attention_bias
    modules: dict[str, Module] = {
        "self_attn.q_proj": Linear(name("self_attn.q_proj"), hidden, heads, bias),
        "self_attn.k_proj": Linear(name("self_attn.k_proj"), hidden, kv_heads, bias),
        "self_attn.v_proj": Linear(name("self_attn.v_proj"), hidden, kv_heads, bias),
        "self_attn.o_proj": Linear(name("self_attn.o_proj"), heads, hidden, bias),
        "mlp.gate_proj": Linear(name("mlp.gate_proj"), hidden, ffn),
        "mlp.up_proj": Linear(name("mlp.up_proj"), hidden, ffn),
        "mlp.down_proj": Linear(name("mlp.down_proj"), ffn, hidden),
    }
    for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"):
        modules[norm] = Norm(name(norm), config.hidden_size)
    if config.model_type == "gemma3_text":
        modules["self_attn.q_norm"] = Norm(name("self_attn.q_norm"), config.head_dim)
        modules["self_attn.k_norm"] = Norm(name("self_attn.k_norm"), config.head_dim)
    return modules


class GemmaRMSNorm(ParallelModule):
    """x / rms(x) * (1 + w), in float32, rounded to the input dtype once (replicated)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(size, dtype=dtype, device=device), False)
        self.shards = {"weight": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.float()
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class GemmaAttention(LlamaAttention):
    """Llama's projections; Gemma's scale, score cap and (Gemma 3) q/k norms."""

    def __init__(self, config, modules: dict[str, Module], layer: int, ctx, plan, dtype):  # noqa: ANN001
        super().__init__(config, modules, layer, ctx, plan, dtype)
        self.scale, self.softcap = config.attention_scale, config.attn_logit_softcapping
        if "self_attn.q_norm" in modules:
            self.q_norm = GemmaRMSNorm(config.head_dim, config.rms_norm_eps, dtype, ctx.device)
            self.k_norm = GemmaRMSNorm(config.head_dim, config.rms_norm_eps, dtype, ctx.device)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: Batch,
                cache: KVCache) -> torch.Tensor:
        B, T = batch.input_ids.shape  # x may be this rank's chunk of the sequence (sequence parallelism)
        q = self.q_proj(x).view(B, T, self.num_local_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_local_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_local_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv_local, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        out = cached_attention(q, k, v, self.layer, cache, batch, self.scale, self.softcap)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_local_heads * self.head_dim))


class GemmaMLP(nn.Module):
    """down(gelu(gate(x)) * up(x))."""

    def __init__(self, config, modules: dict[str, Module], ctx, plan, dtype):  # noqa: ANN001
        super().__init__()
        self.gate_proj = build_linear(modules["mlp.gate_proj"], plan, ctx, dtype)
        self.up_proj = build_linear(modules["mlp.up_proj"], plan, ctx, dtype)
        self.down_proj = build_linear(modules["mlp.down_proj"], plan, ctx, dtype)
        self.approximate = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate=self.approximate) * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config, layer: int, ctx, plan, dtype):  # noqa: ANN001
        super().__init__()
        modules = layer_modules(config, layer)
        norm = lambda: GemmaRMSNorm(config.hidden_size, config.rms_norm_eps, dtype, ctx.device)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.self_attn = GemmaAttention(config, modules, layer, ctx, plan, dtype)
        self.mlp = GemmaMLP(config, modules, ctx, plan, dtype)

    def forward(self, x: torch.Tensor, rope, batch: Batch, cache: KVCache) -> torch.Tensor:  # noqa: ANN001
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, batch, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class GemmaForCausalLM(CausalLM):
    def __init__(self, config, ctx, plan, dtype: torch.dtype, max_seq_len: int):  # noqa: ANN001
        model = DecoderModel(config, ctx, plan, dtype, max_seq_len,
                             lambda i: GemmaDecoderLayer(config, i, ctx, plan, dtype),
                             lambda size: GemmaRMSNorm(size, config.rms_norm_eps, dtype, ctx.device),
                             embed_scale=config.hidden_size**0.5)
        super().__init__(config, ctx, plan, dtype, max_seq_len, model)


FAMILY = Family(
    name="gemma",
    model_types=("gemma2", "gemma3_text"),
    read_config=read_config,
    layer=layer_modules,
    auto_plan=AUTO_PLAN,
    pairs=PAIRS,
    model=GemmaForCausalLM,
)
