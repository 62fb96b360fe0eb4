"""What every decoder-only family shares: embedding, a stack of the family's layers, final norm, LM head, cache.

A family file defines its decoder layer (attention and MLP) and norm, then subclasses ``CausalLM``. Module names
are HF's (``model.embed_tokens``, ``model.layers.{i}``, ``model.norm``, ``lm_head``), so loading is an identity
mapping. Rope tables are built once per layer type ("full_attention", "sliding_attention") and handed to each
layer with its step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tpinfer.config import ModelConfig
from tpinfer.engine.kv_cache import Batch, KVCache
from tpinfer.models.family import EMBED, LM_HEAD
from tpinfer.models.rope import Rope
from tpinfer.parallel.context import ParallelContext
from tpinfer.parallel.layers import ParallelModule, embedding_layer, head_layer, linear_layer
from tpinfer.parallel.plan import ResolvedPlan
from tpinfer.parallel.shard import kv_cache_lengths
from tpinfer.parallel.spec import Embedding, Head, Linear
from tpinfer.quant.layers import quant_head_layer, quant_linear_layer


def build_linear(module: Linear, plan: ResolvedPlan, ctx: ParallelContext, dtype: torch.dtype) -> ParallelModule:
    """The parallel layer for a declared projection, as the plan says (and quantized where it says so)."""
    scheme = plan.scheme(module.name)
    if scheme is not None:
        return quant_linear_layer(module, scheme, plan.strategy(module.name), ctx, dtype)
    return linear_layer(module, plan.strategy(module.name), ctx, dtype)


class DecoderModel(nn.Module):
    """Embedding -> layers -> final norm. ``make_layer(i)`` builds the family's layer i; ``make_norm(size)`` its norm.
    ``embed_scale`` multiplies the embedding output (Gemma: sqrt(hidden_size), in the weights' dtype)."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, plan: ResolvedPlan, dtype: torch.dtype,
                 max_seq_len: int, make_layer: Callable[[int], nn.Module], make_norm: Callable[[int], nn.Module],
                 embed_scale: float | None = None):
        super().__init__()
        embed = Embedding(EMBED, config.vocab_size, config.hidden_size)
        self.embed_tokens = embedding_layer(embed, plan.strategy(EMBED), ctx, dtype)
        self.layers = nn.ModuleList(make_layer(i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config.hidden_size)
        types = sorted({config.layer_type(i) for i in range(config.num_hidden_layers)})
        self.rotary_emb = nn.ModuleDict({
            t: Rope(config.rope_parameters[t], config.head_dim, config.max_position_embeddings, max_seq_len, ctx.device)
            for t in types})
        self.layer_types = [config.layer_type(i) for i in range(config.num_hidden_layers)]
        scale = None if embed_scale is None else torch.tensor(embed_scale).to(dtype).to(ctx.device)
        self.register_buffer("embed_scale", scale, persistent=False)

    def forward(self, batch: Batch, cache: KVCache) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        seq_lens = None
        if any(rope.limit is not None for rope in self.rotary_emb.values()):  # tables that depend on the length
            seq_lens = [int(start) + n for start, n in zip(batch.positions[:, 0].tolist(), batch.lengths, strict=True)]
        ropes = {t: rope(batch.positions, x.dtype, seq_lens) for t, rope in self.rotary_emb.items()}
        for layer, kind in zip(self.layers, self.layer_types, strict=True):
            x = layer(x, ropes[kind], batch, cache)
        return self.norm(x)


class CausalLM(nn.Module):
    """A decoder with its LM head: local (vocab-sharded) logits of the tokens a batch asks for."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, plan: ResolvedPlan, dtype: torch.dtype,
                 max_seq_len: int, model: DecoderModel):
        super().__init__()
        self.config, self.ctx, self.dtype, self.max_seq_len = config, ctx, dtype, max_seq_len
        self.model = model
        tied = model.embed_tokens if config.tie_word_embeddings else None
        head = Head(LM_HEAD, config.vocab_size, config.hidden_size, EMBED if tied is not None else None)
        scheme = plan.scheme(LM_HEAD)
        if scheme is not None:  # --quantize-lm-head
            self.lm_head = quant_head_layer(head, scheme, plan.strategy(LM_HEAD), ctx, dtype)
        else:
            self.lm_head = head_layer(head, plan.strategy(LM_HEAD), ctx, dtype, tied_to=tied)
        self.num_local_kv_heads = model.layers[0].self_attn.num_local_kv_heads
        # A sequence reaching this length has its cache recomputed from position 0 (see Phi-3); None: never.
        self.recompute_length: int | None = None

    def new_cache(self, max_seqs: int, max_seq_len: int | None = None) -> KVCache:
        length = max_seq_len or self.max_seq_len
        windows = [self.config.window(i) for i in range(self.config.num_hidden_layers)]
        return KVCache(kv_cache_lengths(self.config, length), max_seqs, self.num_local_kv_heads, length,
                       self.config.head_dim, self.dtype, self.ctx.device, windows)

    def forward(self, batch: Batch, cache: KVCache) -> torch.Tensor:
        """Local logits of the tokens at ``batch.logits_index``: (B, local vocab); (B, T, local vocab) with
        ``batch.all_logits``."""
        hidden = self.model(batch, cache)
        if batch.all_logits:
            return self.logits(hidden)
        if batch.logits_index is not None:
            hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch.logits_index]
        else:
            hidden = hidden[:, -1]
        return self.logits(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head on final hidden states, soft-capped as c * tanh(logits / c) where the config says so."""
        out = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        return out

    def gather_logits(self, local_logits: torch.Tensor) -> torch.Tensor:
        """Full float32 logits (B, vocab_size) on every rank."""
        return self.lm_head.gather(local_logits).float()
