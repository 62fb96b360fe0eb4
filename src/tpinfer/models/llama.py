"""Llama-family decoder (llama, mistral, qwen2) built from tpinfer's parallel layers.

Module and parameter names equal HF checkpoint names; RoPE uses HF's rotate-half layout. The model
knows about ranks only through the ParallelContext and the layers the plan gives it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tpinfer import kernels
from tpinfer.config import ModelConfig
from tpinfer.engine.kv_cache import Batch, KVCache
from tpinfer.parallel.context import ParallelContext
from tpinfer.parallel.layers import (
    NATIVE_MAX_ROWS,
    ColumnParallelLinear,
    ParallelLMHead,
    ReplicatedEmbedding,
    ReplicatedLinear,
    ReplicatedLMHead,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    uses_native,
)
from tpinfer.parallel.plan import COLWISE, REPLICATE, ResolvedPlan, kv_rows
from tpinfer.parallel.shard import o_proj_has_bias, shard_range

_SDPA_GQA = "enable_gqa" in torch.nn.functional.scaled_dot_product_attention.__doc__


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in float32, with linear or llama3 scaling as HF computes them."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [0, max_seq_len), looked up per token."""

    def __init__(self, config: ModelConfig, max_seq_len: int, device: torch.device):
        super().__init__()
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), rope_inv_freq(config))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().to(device), persistent=False)
        self.register_buffer("sin", emb.sin().to(device), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, 1, T, D): broadcast over heads
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _linear(name: str, plan: ResolvedPlan, ctx: ParallelContext, in_f: int, out_f: int, bias: bool, dtype,
            shard: tuple[int, int] | None = None) -> nn.Module:
    strategy = plan.strategy(name)
    if strategy == COLWISE:
        return ColumnParallelLinear(in_f, out_f, ctx, bias, dtype, out_shard=shard)
    if strategy == REPLICATE:
        return ReplicatedLinear(in_f, out_f, bias, dtype, ctx.device)
    return RowParallelLinear(in_f, out_f, ctx, bias, dtype, in_shard=shard)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, ctx: ParallelContext, plan: ResolvedPlan, dtype):
        super().__init__()
        p = f"model.layers.{layer}.self_attn."
        hidden, head_dim = config.hidden_size, config.head_dim
        self.layer, self.head_dim = layer, head_dim
        sharded = plan.strategy(p + "q_proj") == COLWISE
        if sharded:
            q_start, q_len = (x * head_dim for x in shard_range(config.num_attention_heads, ctx.rank, ctx.world_size))
            q_shard, kv_shard = (q_start, q_len), kv_rows(config, ctx.rank, ctx.world_size)
        else:
            q_shard, kv_shard = (0, config.q_size), (0, config.kv_size)
        self.num_local_heads = q_shard[1] // head_dim
        self.num_local_kv_heads = kv_shard[1] // head_dim
        bias = config.attention_bias
        self.q_proj = _linear(p + "q_proj", plan, ctx, hidden, config.q_size, bias, dtype, q_shard)
        self.k_proj = _linear(p + "k_proj", plan, ctx, hidden, config.kv_size, bias, dtype, kv_shard)
        self.v_proj = _linear(p + "v_proj", plan, ctx, hidden, config.kv_size, bias, dtype, kv_shard)
        self.o_proj = _linear(p + "o_proj", plan, ctx, config.q_size, hidden, o_proj_has_bias(config), dtype, q_shard)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                batch: Batch, cache: KVCache) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_local_heads, self.head_dim).transpose(1, 2)  # (B, H_local, T, D)
        k = self.k_proj(x).view(B, T, self.num_local_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_local_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache, v_cache = cache.keys[self.layer], cache.values[self.layer]
        if batch.single_row_start is not None:  # one sequence: its tokens are one slice of its slot
            slot, start = batch.single_row_start
            k_cache[slot, :, start : start + T] = k[0]
            v_cache[slot, :, start : start + T] = v[0]
        else:
            rows = batch.slots[:, None].expand(B, T)
            k_cache[rows, :, batch.positions] = k.transpose(1, 2)  # (B, T, H_kv_local, D) into its slots
            v_cache[rows, :, batch.positions] = v.transpose(1, 2)
        if batch.contiguous:
            first = int(batch.slots[0])
            keys = k_cache[first : first + B, :, : batch.kv_len]  # (B, H_kv_local, L, D)
            values = v_cache[first : first + B, :, : batch.kv_len]
        else:
            keys = k_cache.index_select(0, batch.slots)[:, :, : batch.kv_len]
            values = v_cache.index_select(0, batch.slots)[:, :, : batch.kv_len]
        # A lone sequence's prefill from position 0 is plain causal attention (SDPA's fused causal kernel).
        causal = mask is None and T > 1
        if self.num_local_kv_heads != self.num_local_heads:
            if _SDPA_GQA:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=True)
            else:
                groups = self.num_local_heads // self.num_local_kv_heads
                keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_local_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, ctx: ParallelContext, plan: ResolvedPlan, dtype):
        super().__init__()
        p = f"model.layers.{layer}.mlp."
        hidden, ffn, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = _linear(p + "gate_proj", plan, ctx, hidden, ffn, bias, dtype)
        self.up_proj = _linear(p + "up_proj", plan, ctx, hidden, ffn, bias, dtype)
        self.down_proj = _linear(p + "down_proj", plan, ctx, ffn, hidden, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj, self.up_proj
        if uses_native(x, gate.weight):  # both projections and silu(g) * u in one pass
            return self.down_proj(kernels.gated_linear(x, gate.weight, up.weight, gate.bias, up.bias))
        return self.down_proj(F.silu(gate(x)) * up(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, ctx: ParallelContext, plan: ResolvedPlan, dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, ctx.device)
        self.self_attn = LlamaAttention(config, layer, ctx, plan, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, ctx.device)
        self.mlp = LlamaMLP(config, layer, ctx, plan, dtype)
        self.world_size = ctx.world_size
        self._described: tuple[torch.Tensor, kernels.DecodeLayer] | None = None  # see _decode_layer

    def forward(self, x, cos, sin, mask, batch: Batch, cache: KVCache) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, batch, cache)
        return h + self.mlp(self.post_attention_layernorm(h))

    def supports_decode_kernels(self) -> bool:
        """Whether this layer's plan is one the fused decode kernels implement: q/k/v and gate/up local
        (column-parallel or replicated), o and down row-parallel or replicated."""
        attn, mlp = self.self_attn, self.mlp
        local = (ColumnParallelLinear, ReplicatedLinear)
        return (all(isinstance(m, local) for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj))
                and all(isinstance(m, (RowParallelLinear, ReplicatedLinear)) for m in (attn.o_proj, mlp.down_proj))
                and attn.head_dim <= kernels.MAX_HEAD_DIM)

    def decode(self, x: torch.Tensor, delta: torch.Tensor | None, rope: RotaryEmbedding, batch: Batch,
               cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` for one new token per row through the native kernels, two calls and two all-reduces.

        The residual add is deferred: takes the stream before the previous layer's last add (x, delta), updates x
        in place and returns this layer's (x, delta)."""
        layer = self._decode_layer(cache)
        partial = kernels.layer_attention(layer, x, delta, rope.cos, rope.sin, batch.slots, batch.positions.view(-1))
        attn_out = self.self_attn.o_proj.finish(partial)
        return x, self.mlp.down_proj.finish(kernels.layer_mlp(layer, x, attn_out))

    def _decode_layer(self, cache: KVCache) -> kernels.DecodeLayer:
        k_cache, v_cache = cache.keys[self.self_attn.layer], cache.values[self.self_attn.layer]
        described = self._described
        if described is None or described[0] is not k_cache:  # a new cache (more slots): describe again
            attn, mlp = self.self_attn, self.mlp
            modules = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj, "g": mlp.gate_proj,
                       "u": mlp.up_proj, "d": mlp.down_proj}
            norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
            several = self.world_size > 1
            reduce = (several and isinstance(attn.o_proj, RowParallelLinear),
                      several and isinstance(mlp.down_proj, RowParallelLinear))
            layer = kernels.decode_layer(norm1.weight, norm2.weight, norm1.eps, norm2.eps,
                                         {k: (m.weight, m.bias) for k, m in modules.items()}, k_cache, v_cache, reduce)
            self._described = described = (k_cache, layer)
        return described[1]


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, ctx: ParallelContext, plan: ResolvedPlan, dtype, max_seq_len: int):
        super().__init__()
        vocab, hidden = config.vocab_size, config.hidden_size
        if plan.strategy("model.embed_tokens") == REPLICATE:
            self.embed_tokens = ReplicatedEmbedding(vocab, hidden, ctx, dtype)
        else:
            self.embed_tokens = VocabParallelEmbedding(vocab, hidden, ctx, dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, ctx, plan, dtype) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(hidden, config.rms_norm_eps, dtype, ctx.device)
        self.rotary_emb = RotaryEmbedding(config, max_seq_len, ctx.device)
        self.decode_kernels = all(layer.supports_decode_kernels() for layer in self.layers)
        self.ctx = ctx
        self._stack: tuple[torch.Tensor, kernels.DecodeStack] | None = None  # see _decode_stack

    def _decode_stack(self, cache: KVCache, tail: torch.Tensor | None) -> kernels.DecodeStack:
        if self._stack is None or self._stack[0] is not cache.keys[0]:  # a new cache: describe the layers again
            stack = kernels.DecodeStack([layer._decode_layer(cache) for layer in self.layers], tail)
            self._stack = (cache.keys[0], stack)
        return self._stack[1]

    def _finish_half(self, half: int, out: torch.Tensor) -> None:
        """Half-layer ``half``'s all-reduce, left open by the native stack for a late peer, and its bias."""
        self.ctx.comm.finish_native(out)
        layer = self.layers[half // 2]
        bias = layer.self_attn.o_proj.bias if half % 2 == 0 else layer.mlp.down_proj.bias
        if bias is not None:
            out.add_(bias)

    def forward(self, batch: Batch, cache: KVCache, tail: torch.Tensor | None = None) -> torch.Tensor:
        """``tail``: the weight read right after the stack (the LM head), prefetched while the last all-reduce waits."""
        x = self.embed_tokens(batch.input_ids)
        T = batch.input_ids.shape[1]
        if T == 1 and self.decode_kernels and x.shape[0] <= NATIVE_MAX_ROWS.get(x.dtype, 0) and kernels.usable(x):
            # Decode through the native kernels, which index the cache without bounds checks: check the step's
            # slots and positions once here.
            if batch.kv_len > cache.max_seq_len or int(batch.slots.max()) >= cache.max_seqs:
                raise IndexError(f"decode step outside the KV cache: positions up to {batch.kv_len - 1} and slots up "
                                 f"to {int(batch.slots.max())} for {cache.max_seqs} slots x {cache.max_seq_len}")
            usable, group = self.ctx.comm.native_group(x.numel() * x.element_size())
            if usable:  # every layer in one native call, all-reduces included
                x, delta = self._decode_stack(cache, tail).run(x, self.rotary_emb.cos, self.rotary_emb.sin, batch.slots,
                                                         batch.positions.view(-1), group, self._finish_half)
                self.ctx.comm.native_done()
            else:  # the sums go through gloo/NCCL: two native calls per layer, all-reduces in between
                delta = None
                for layer in self.layers:
                    x, delta = layer.decode(x, delta, self.rotary_emb, batch, cache)
            return kernels.add_rms_norm(x, delta, self.norm.weight, self.norm.eps)[1]
        cos, sin = self.rotary_emb(batch.positions, x.dtype)
        if batch.single_row_start is not None and (T == 1 or batch.single_row_start[1] == 0):
            # One sequence: a single new token sees every cached position; a prefill from position 0 is
            # causal over exactly its own tokens (kv_len == T). Either way no mask tensor is needed.
            mask = None
        else:
            key_positions = torch.arange(batch.kv_len, device=x.device)
            mask = (key_positions[None, None, :] <= batch.positions[:, :, None]).unsqueeze(1)  # (B, 1, T, L)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, batch, cache)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, ctx: ParallelContext, plan: ResolvedPlan, dtype: torch.dtype,
                 max_seq_len: int):
        super().__init__()
        self.config, self.ctx, self.dtype, self.max_seq_len = config, ctx, dtype, max_seq_len
        self.model = LlamaModel(config, ctx, plan, dtype, max_seq_len)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        vocab_parallel = plan.strategy("lm_head") != REPLICATE
        if tied is not None and isinstance(tied, VocabParallelEmbedding) != vocab_parallel:
            raise ValueError("tied embeddings need embed_tokens and lm_head to share a strategy")
        head = ParallelLMHead if vocab_parallel else ReplicatedLMHead
        self.lm_head = head(config.vocab_size, config.hidden_size, ctx, dtype, tied_to=tied)
        attn = self.model.layers[0].self_attn
        self.num_local_kv_heads = attn.num_local_kv_heads

    def new_cache(self, max_seqs: int, max_seq_len: int | None = None) -> KVCache:
        return KVCache(self.config.num_hidden_layers, max_seqs, self.num_local_kv_heads, max_seq_len or self.max_seq_len,
                       self.config.head_dim, self.dtype, self.ctx.device)

    def forward(self, batch: Batch, cache: KVCache) -> torch.Tensor:
        """Local (vocab-sharded) logits of the tokens at ``batch.logits_index``: (B, local vocab)."""
        hidden = self.model(batch, cache, self.lm_head.weight)
        if batch.logits_index is not None:
            hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch.logits_index]
        else:
            hidden = hidden[:, -1]
        return self.lm_head(hidden)

    def gather_logits(self, local_logits: torch.Tensor) -> torch.Tensor:
        """Full float32 logits (B, vocab_size) on every rank."""
        return self.lm_head.gather(local_logits).float()
